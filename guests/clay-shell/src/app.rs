//! The Wayland window: an xdg toplevel drawn into shared-memory buffers,
//! keyboard input through xkbcommon (via smithay-client-toolkit).

use std::time::Duration;

use smithay_client_toolkit::reexports::calloop::{EventLoop, LoopHandle};
use smithay_client_toolkit::reexports::calloop_wayland_source::WaylandSource;
use smithay_client_toolkit::reexports::client::globals::registry_queue_init;
use smithay_client_toolkit::reexports::client::protocol::{
    wl_keyboard, wl_output, wl_seat, wl_shm, wl_surface,
};
use smithay_client_toolkit::reexports::client::{Connection, QueueHandle};
use smithay_client_toolkit::{
    compositor::{CompositorHandler, CompositorState},
    delegate_compositor, delegate_keyboard, delegate_output, delegate_registry, delegate_seat,
    delegate_shm, delegate_xdg_shell, delegate_xdg_window,
    output::{OutputHandler, OutputState},
    registry::{ProvidesRegistryState, RegistryState},
    registry_handlers,
    seat::{
        keyboard::{KeyEvent, KeyboardHandler, Keysym, Modifiers},
        Capability, SeatHandler, SeatState,
    },
    shell::{
        xdg::{
            window::{Window, WindowConfigure, WindowDecorations, WindowHandler},
            XdgShell,
        },
        WaylandSurface,
    },
    shm::{slot::SlotPool, Shm, ShmHandler},
};

use crate::render::{self, Canvas};
use crate::shell::Shell;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot connect to the Wayland compositor (is WAYLAND_DISPLAY set?): {0}")]
    Connect(String),
    #[error("the compositor lacks {0}")]
    MissingGlobal(&'static str),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("shared memory: {0}")]
    Shm(String),
}

const DEFAULT_SIZE: (u32, u32) = (900, 640);

/// Opens the Clay window and runs until the compositor closes it.
pub fn run(shell: Shell, font: fontdue::Font) -> Result<(), AppError> {
    let conn = Connection::connect_to_env().map_err(|e| AppError::Connect(e.to_string()))?;
    let (globals, queue) =
        registry_queue_init(&conn).map_err(|e| AppError::Connect(e.to_string()))?;
    let qh = queue.handle();
    let mut event_loop: EventLoop<App> =
        EventLoop::try_new().map_err(|e| AppError::EventLoop(e.to_string()))?;
    WaylandSource::new(conn.clone(), queue)
        .insert(event_loop.handle())
        .map_err(|e| AppError::EventLoop(e.to_string()))?;

    let compositor = CompositorState::bind(&globals, &qh)
        .map_err(|_| AppError::MissingGlobal("wl_compositor"))?;
    let xdg = XdgShell::bind(&globals, &qh).map_err(|_| AppError::MissingGlobal("xdg_wm_base"))?;
    let shm = Shm::bind(&globals, &qh).map_err(|_| AppError::MissingGlobal("wl_shm"))?;
    let surface = compositor.create_surface(&qh);
    let window = xdg.create_window(surface, WindowDecorations::ServerDefault, &qh);
    window.set_title("Clay");
    window.set_app_id("kiln.clay.shell");
    window.set_min_size(Some((480, 320)));
    window.commit();
    let (w, h) = DEFAULT_SIZE;
    let pool =
        SlotPool::new((w * h * 4) as usize, &shm).map_err(|e| AppError::Shm(e.to_string()))?;

    let mut app = App {
        registry: RegistryState::new(&globals),
        seats: SeatState::new(&globals, &qh),
        outputs: OutputState::new(&globals, &qh),
        shm,
        pool,
        window,
        keyboard: None,
        loop_handle: event_loop.handle(),
        width: w,
        height: h,
        configured: false,
        dirty: true,
        exit: false,
        shell,
        font,
    };
    while !app.exit {
        event_loop
            .dispatch(Duration::from_millis(100), &mut app)
            .map_err(|e| AppError::EventLoop(e.to_string()))?;
        if app.shell.poll() {
            app.dirty = true;
        }
        if app.dirty && app.configured {
            app.draw(&qh);
        }
    }
    Ok(())
}

struct App {
    registry: RegistryState,
    seats: SeatState,
    outputs: OutputState,
    shm: Shm,
    pool: SlotPool,
    window: Window,
    keyboard: Option<wl_keyboard::WlKeyboard>,
    loop_handle: LoopHandle<'static, App>,
    width: u32,
    height: u32,
    configured: bool,
    dirty: bool,
    exit: bool,
    shell: Shell,
    font: fontdue::Font,
}

impl App {
    fn draw(&mut self, _qh: &QueueHandle<Self>) {
        let (w, h) = (self.width.max(1), self.height.max(1));
        let stride = w as i32 * 4;
        let (buffer, bytes) =
            match self
                .pool
                .create_buffer(w as i32, h as i32, stride, wl_shm::Format::Argb8888)
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "cannot allocate a frame buffer");
                    return;
                }
            };
        let mut canvas = Canvas::new(w as usize, h as usize);
        render::draw(&self.shell.view, &mut canvas, &self.font);
        canvas.write_argb8888_le(bytes);
        let surface = self.window.wl_surface();
        surface.damage_buffer(0, 0, w as i32, h as i32);
        if let Err(e) = buffer.attach_to(surface) {
            tracing::error!(error = %e, "cannot attach the frame buffer");
            return;
        }
        self.window.commit();
        self.dirty = false;
    }

    fn key(&mut self, event: &KeyEvent) {
        match event.keysym {
            Keysym::Return | Keysym::KP_Enter => self.shell.submit(),
            Keysym::BackSpace => self.shell.backspace(),
            Keysym::Escape => self.shell.clear(),
            _ => match &event.utf8 {
                Some(text) => self.shell.type_text(text),
                None => return,
            },
        }
        self.dirty = true;
    }
}

impl CompositorHandler for App {
    fn scale_factor_changed(
        &mut self,
        _: &Connection,
        _: &QueueHandle<Self>,
        _: &wl_surface::WlSurface,
        _: i32,
    ) {
    }
    fn transform_changed(
        &mut self,
        _: &Connection,
        _: &QueueHandle<Self>,
        _: &wl_surface::WlSurface,
        _: wl_output::Transform,
    ) {
    }
    fn frame(&mut self, _: &Connection, _: &QueueHandle<Self>, _: &wl_surface::WlSurface, _: u32) {}
    fn surface_enter(
        &mut self,
        _: &Connection,
        _: &QueueHandle<Self>,
        _: &wl_surface::WlSurface,
        _: &wl_output::WlOutput,
    ) {
    }
    fn surface_leave(
        &mut self,
        _: &Connection,
        _: &QueueHandle<Self>,
        _: &wl_surface::WlSurface,
        _: &wl_output::WlOutput,
    ) {
    }
}

impl OutputHandler for App {
    fn output_state(&mut self) -> &mut OutputState {
        &mut self.outputs
    }
    fn new_output(&mut self, _: &Connection, _: &QueueHandle<Self>, _: wl_output::WlOutput) {}
    fn update_output(&mut self, _: &Connection, _: &QueueHandle<Self>, _: wl_output::WlOutput) {}
    fn output_destroyed(&mut self, _: &Connection, _: &QueueHandle<Self>, _: wl_output::WlOutput) {}
}

impl WindowHandler for App {
    fn request_close(&mut self, _: &Connection, _: &QueueHandle<Self>, _: &Window) {
        self.exit = true;
    }

    fn configure(
        &mut self,
        _: &Connection,
        qh: &QueueHandle<Self>,
        _: &Window,
        configure: WindowConfigure,
        _: u32,
    ) {
        self.width = configure
            .new_size
            .0
            .map(|v| v.get())
            .unwrap_or(DEFAULT_SIZE.0);
        self.height = configure
            .new_size
            .1
            .map(|v| v.get())
            .unwrap_or(DEFAULT_SIZE.1);
        self.configured = true;
        self.draw(qh);
    }
}

impl SeatHandler for App {
    fn seat_state(&mut self) -> &mut SeatState {
        &mut self.seats
    }
    fn new_seat(&mut self, _: &Connection, _: &QueueHandle<Self>, _: wl_seat::WlSeat) {}

    fn new_capability(
        &mut self,
        _: &Connection,
        qh: &QueueHandle<Self>,
        seat: wl_seat::WlSeat,
        capability: Capability,
    ) {
        if capability == Capability::Keyboard && self.keyboard.is_none() {
            let repeat = Box::new(
                |app: &mut App, _: &wl_keyboard::WlKeyboard, event: KeyEvent| app.key(&event),
            );
            match self.seats.get_keyboard_with_repeat(
                qh,
                &seat,
                None,
                self.loop_handle.clone(),
                repeat,
            ) {
                Ok(k) => self.keyboard = Some(k),
                Err(e) => tracing::error!(error = %e, "cannot use the keyboard"),
            }
        }
    }

    fn remove_capability(
        &mut self,
        _: &Connection,
        _: &QueueHandle<Self>,
        _: wl_seat::WlSeat,
        capability: Capability,
    ) {
        if capability == Capability::Keyboard {
            if let Some(k) = self.keyboard.take() {
                k.release();
            }
        }
    }
    fn remove_seat(&mut self, _: &Connection, _: &QueueHandle<Self>, _: wl_seat::WlSeat) {}
}

impl KeyboardHandler for App {
    fn enter(
        &mut self,
        _: &Connection,
        _: &QueueHandle<Self>,
        _: &wl_keyboard::WlKeyboard,
        _: &wl_surface::WlSurface,
        _: u32,
        _: &[u32],
        _: &[Keysym],
    ) {
    }
    fn leave(
        &mut self,
        _: &Connection,
        _: &QueueHandle<Self>,
        _: &wl_keyboard::WlKeyboard,
        _: &wl_surface::WlSurface,
        _: u32,
    ) {
    }
    fn press_key(
        &mut self,
        _: &Connection,
        _: &QueueHandle<Self>,
        _: &wl_keyboard::WlKeyboard,
        _: u32,
        event: KeyEvent,
    ) {
        self.key(&event);
    }
    fn release_key(
        &mut self,
        _: &Connection,
        _: &QueueHandle<Self>,
        _: &wl_keyboard::WlKeyboard,
        _: u32,
        _: KeyEvent,
    ) {
    }
    fn update_modifiers(
        &mut self,
        _: &Connection,
        _: &QueueHandle<Self>,
        _: &wl_keyboard::WlKeyboard,
        _: u32,
        _: Modifiers,
        _: u32,
    ) {
    }
}

impl ShmHandler for App {
    fn shm_state(&mut self) -> &mut Shm {
        &mut self.shm
    }
}

impl ProvidesRegistryState for App {
    fn registry(&mut self) -> &mut RegistryState {
        &mut self.registry
    }
    registry_handlers![OutputState, SeatState];
}

delegate_compositor!(App);
delegate_output!(App);
delegate_shm!(App);
delegate_seat!(App);
delegate_keyboard!(App);
delegate_xdg_shell!(App);
delegate_xdg_window!(App);
delegate_registry!(App);
