//! Renders the shell as a person would see it and checks the picture: the
//! intent bar with its accent border, typed text inside it, and results
//! below. The frame is kept as a PNG test artifact.

use clay_shell::actions::{ActionContext, Outcome};
use clay_shell::render::{
    self, Canvas, Entry, View, ACCENT, BACKGROUND, BAR_FILL, BAR_HEIGHT, BAR_TOP,
};
use clay_shell::shell::Shell;

fn font() -> fontdue::Font {
    render::load_font().expect("the UI font must be installed (apt-get install fonts-dejavu-core)")
}

fn save_png(canvas: &Canvas, name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let file = std::fs::File::create(&path).expect("create png");
    let mut enc = png::Encoder::new(
        std::io::BufWriter::new(file),
        canvas.width as u32,
        canvas.height as u32,
    );
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().expect("png header");
    let rgb: Vec<u8> = canvas
        .pixels
        .iter()
        .flat_map(|p| [(p >> 16) as u8, (p >> 8) as u8, *p as u8])
        .collect();
    writer.write_image_data(&rgb).expect("png data");
    path
}

fn count(
    canvas: &Canvas,
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
    pred: impl Fn(u32) -> bool,
) -> usize {
    (y0..y1)
        .flat_map(|y| (x0..x1).map(move |x| (x, y)))
        .filter(|&(x, y)| canvas.pixel(x, y).is_some_and(&pred))
        .count()
}

#[test]
fn frame_shows_the_intent_bar_typed_text_and_results() {
    let font = font();
    let view = View {
        input: "how much memory is free".into(),
        entries: vec![
            Entry {
                request: "list my files".into(),
                ok: true,
                summary: "2 entries in /home/clay:".into(),
                details: vec!["a.txt".into(), "docs/".into()],
            },
            Entry {
                request: "frobnicate".into(),
                ok: false,
                summary: "I don't know how to do that.".into(),
                details: vec![],
            },
        ],
    };
    let mut canvas = Canvas::new(800, 600);
    render::draw(&view, &mut canvas, &font);
    let png = save_png(&canvas, "clay-shell-frame.png");
    eprintln!("frame written to {}", png.display());

    // Background in the corner, accent border on the bar's edge, bar fill inside.
    assert_eq!(canvas.pixel(2, 590), Some(BACKGROUND));
    assert_eq!(canvas.pixel(400, BAR_TOP as usize), Some(ACCENT));
    assert_eq!(
        canvas.pixel(30, (BAR_TOP + BAR_HEIGHT / 2) as usize),
        Some(BAR_FILL)
    );
    // Typed text: light glyph pixels inside the bar, left part only.
    let bar_y = (BAR_TOP + 4) as usize..(BAR_TOP + BAR_HEIGHT - 4) as usize;
    let bright = |p: u32| (p >> 16 & 0xFF) > 0xC0 && (p & 0xFF) > 0xC0;
    let text_px = count(&canvas, 40, bar_y.start, 400, bar_y.end, bright);
    assert!(
        text_px > 200,
        "typed text not visible in the bar ({text_px} bright pixels)"
    );
    assert_eq!(
        count(&canvas, 600, bar_y.start, 770, bar_y.end, bright),
        0,
        "text drawn past its end"
    );
    // Results below the bar: something drawn that is not background.
    let results = count(&canvas, 24, 150, 600, 400, |p| p != BACKGROUND);
    assert!(results > 500, "results surface is empty ({results} pixels)");
}

#[test]
fn empty_bar_shows_placeholder_and_long_input_keeps_its_end_visible() {
    let font = font();
    let mut canvas = Canvas::new(640, 200);
    render::draw(&View::default(), &mut canvas, &font);
    let muted = count(
        &canvas,
        40,
        BAR_TOP as usize,
        600,
        (BAR_TOP + BAR_HEIGHT) as usize,
        |p| p != BAR_FILL && p != ACCENT,
    );
    assert!(muted > 200, "placeholder missing");

    let mut ctx = ActionContext::from_env();
    ctx.terminal = vec!["true".into()];
    let mut shell = Shell::new(ctx);
    shell.type_text(&"very long request ".repeat(40));
    let mut canvas = Canvas::new(640, 200);
    render::draw(&shell.view, &mut canvas, &font);
    save_png(&canvas, "clay-shell-long-input.png");
    // Text reaches the right end of the bar, and the caret stays inside it.
    let right_part = count(
        &canvas,
        450,
        (BAR_TOP + 6) as usize,
        600,
        (BAR_TOP + BAR_HEIGHT - 6) as usize,
        |p| p != BAR_FILL,
    );
    assert!(right_part > 50);
    let beyond = count(
        &canvas,
        617,
        (BAR_TOP + 2) as usize,
        640,
        (BAR_TOP + BAR_HEIGHT - 2) as usize,
        |p| p != BACKGROUND && p != ACCENT,
    );
    assert_eq!(beyond, 0, "drawing escaped the bar");
}

#[test]
fn entries_from_outcomes_keep_status_and_details() {
    let o = Outcome {
        ok: false,
        summary: "x".into(),
        details: vec!["d".into()],
        follow_up: None,
    };
    let e = Entry::from_outcome("req", &o);
    assert_eq!((e.ok, e.summary.as_str(), e.details.len()), (false, "x", 1));
}
