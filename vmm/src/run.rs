//! One VM until it powers off, reboots, crashes, is stopped through its
//! control socket, or the host stops it: `kiln run` in the foreground and
//! the `kiln-vmm` process alike.

use std::fs::{File, OpenOptions};
use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Context, Result};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kiln_devices::legacy::SerialOutput;
use kiln_devices::ExitReason;
use kvm_ioctls::Kvm;

use crate::config::{OnReboot, SerialConsole as ConsoleMode, VmConfig};
use crate::console::{stop_signals_fd, ConsoleInput, ConsoleOutputFlush, VmControl};
use crate::console_socket::ConsoleSocket;
use crate::terminal::RawTerminal;
use crate::{cpu, vm};

pub fn run(config: &VmConfig, control: Option<&std::path::Path>) -> Result<ExitReason> {
    // Bad input is reported as such even where KVM is missing.
    let mut host = crate::HostLimits::of_this_host();
    config.validate(&host)?;
    let kvm =
        Kvm::new().context("cannot open /dev/kvm (is KVM available and do you have access?)")?;
    host.max_vcpus = u32::try_from(kvm.get_max_vcpus()).ok();
    config.validate(&host)?;
    cpu::vcpu::install_kick_handler()?;
    let signals = stop_signals_fd().context("setting up signal handling")?;
    let _terminal = match config.serial {
        ConsoleMode::Stdio => RawTerminal::enable(),
        _ => None,
    };
    let mut signals = Some(signals);
    // Bound once: clients stay attached across a guest reboot.
    let console_socket = match &config.serial {
        ConsoleMode::Socket(s) => Some(ConsoleSocket::bind(s)?),
        _ => None,
    };
    loop {
        let output = match &console_socket {
            Some(c) => c.output(),
            None => serial_output(&config.serial)?,
        };
        let vm = vm::build(&kvm, config, output)?;
        let _control = match control {
            Some(path) => Some(crate::control::ControlSocket::start(path, vm.handle())?),
            None => None,
        };
        let mut events: EventManager<Box<dyn MutEventSubscriber>> =
            EventManager::new().context("creating the event loop")?;
        if config.serial == ConsoleMode::Stdio {
            if let Some(input) = console_input()? {
                events.add_subscriber(Box::new(ConsoleInput::new(
                    input,
                    vm.serial.console.clone(),
                    vm.serial.rx_room.try_clone()?,
                )));
            }
        }
        if let Some(c) = &console_socket {
            events.add_subscriber(Box::new(
                c.subscriber(vm.serial.console.clone(), vm.serial.rx_room.try_clone()?),
            ));
        }
        events.add_subscriber(Box::new(ConsoleOutputFlush::new(
            vm.serial.console.clone(),
            vm.serial.flush.try_clone()?,
        )));
        let control = VmControl::new(vm.lifecycle().clone(), signals.take());
        let control_id = events.add_subscriber(Box::new(control));
        while !vm.lifecycle().is_stopping() {
            events.run().context("event loop failed")?;
        }
        let reason = vm.lifecycle().exit_reason().unwrap_or(ExitReason::PowerOff);
        // Hand the signalfd to the next VM if we restart.
        if let Ok(control) = events.remove_subscriber(control_id) {
            drop(control);
        }
        signals = Some(stop_signals_fd()?);
        vm.stop();
        if reason == ExitReason::Reset && config.on_reboot == OnReboot::Restart {
            eprintln!("kiln: guest rebooted; restarting it (--on-reboot restart)");
            continue;
        }
        return Ok(reason);
    }
}

fn serial_output(mode: &ConsoleMode) -> Result<SerialOutput> {
    Ok(match mode {
        // A dup of stdout as a File: unbuffered, so prompts without a
        // newline appear at once.
        ConsoleMode::Stdio => Box::new(dup_fd(libc::STDOUT_FILENO).context("duplicating stdout")?),
        ConsoleMode::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open console file {}", path.display()))?,
        ),
        ConsoleMode::None | ConsoleMode::Socket(_) => Box::new(std::io::sink()),
    })
}

/// Our stdin as something epoll can watch. A regular file can't be polled,
/// so it is copied through a pipe by a small thread.
fn console_input() -> Result<Option<File>> {
    let stdin = dup_fd(libc::STDIN_FILENO).context("duplicating stdin")?;
    let meta = match stdin.metadata() {
        Ok(m) => m,
        Err(_) => return Ok(None), // closed stdin: no keyboard
    };
    if !meta.is_file() {
        return Ok(Some(stdin));
    }
    let (reader, mut writer) = std::io::pipe().context("creating the console input pipe")?;
    let mut stdin = stdin;
    std::thread::Builder::new()
        .name("kiln-stdin".into())
        .spawn(move || {
            let _ = std::io::copy(&mut stdin, &mut writer);
        })
        .context("starting the console input thread")?;
    Ok(Some(File::from(OwnedFd::from(reader))))
}

fn dup_fd(fd: i32) -> std::io::Result<File> {
    // SAFETY: dup returns a new fd we own, or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh, owned descriptor.
    Ok(unsafe { File::from_raw_fd(new) })
}
