//! Software rendering of the Clay shell into an ARGB8888 pixel buffer (the
//! format of a Wayland shm buffer), so it needs no GPU and no 3D driver.

use std::path::{Path, PathBuf};

use crate::actions::Outcome;

/// Colours of the shell, as 0xAARRGGBB. Screenshots are checked for the
/// background and the intent bar's accent border, so keep them distinctive.
pub const BACKGROUND: u32 = 0xFF1E2430;
pub const BAR_FILL: u32 = 0xFF2F3A4D;
pub const ACCENT: u32 = 0xFF6AA0FF;
const TEXT: u32 = 0xFFE8ECF4;
const MUTED: u32 = 0xFF8C96A8;
const GOOD: u32 = 0xFF8FD694;
const BAD: u32 = 0xFFFF8A80;

pub const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

#[derive(Debug, thiserror::Error)]
pub enum FontError {
    #[error("no font found (set CLAY_FONT or install fonts-dejavu-core); tried {0:?}")]
    NotFound(Vec<PathBuf>),
    #[error("cannot read font {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse font {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Loads the UI font: `$CLAY_FONT`, else DejaVu Sans from fonts-dejavu-core.
pub fn load_font() -> Result<fontdue::Font, FontError> {
    let mut tried = Vec::new();
    let env = std::env::var_os("CLAY_FONT").map(PathBuf::from);
    for path in env
        .into_iter()
        .chain(FONT_CANDIDATES.iter().map(PathBuf::from))
    {
        if path.is_file() {
            return load_font_file(&path);
        }
        tried.push(path);
    }
    Err(FontError::NotFound(tried))
}

pub fn load_font_file(path: &Path) -> Result<fontdue::Font, FontError> {
    let bytes = std::fs::read(path).map_err(|source| FontError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    fontdue::Font::from_bytes(bytes, fontdue::FontSettings::default()).map_err(|m| {
        FontError::Parse {
            path: path.to_path_buf(),
            message: m.to_string(),
        }
    })
}

/// One request and what came of it, as shown in the results surface.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub request: String,
    pub ok: bool,
    pub summary: String,
    pub details: Vec<String>,
}

impl Entry {
    pub fn from_outcome(request: &str, o: &Outcome) -> Entry {
        Entry {
            request: request.to_string(),
            ok: o.ok,
            summary: o.summary.clone(),
            details: o.details.clone(),
        }
    }
}

/// Everything the shell shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub input: String,
    /// Newest first.
    pub entries: Vec<Entry>,
}

/// Text size in pixels and colour.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub size: f32,
    pub colour: u32,
}

const fn style(size: f32, colour: u32) -> Style {
    Style { size, colour }
}

/// A pixel buffer in ARGB8888, row-major without padding.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u32>,
}

impl Canvas {
    pub fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            pixels: vec![0; width * height],
        }
    }

    pub fn pixel(&self, x: usize, y: usize) -> Option<u32> {
        (x < self.width && y < self.height).then(|| self.pixels[y * self.width + x])
    }

    pub fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, colour: u32) {
        let x0 = x.clamp(0, self.width as i64) as usize;
        let x1 = (x + w).clamp(0, self.width as i64) as usize;
        let y0 = y.clamp(0, self.height as i64) as usize;
        let y1 = (y + h).clamp(0, self.height as i64) as usize;
        for row in y0..y1 {
            self.pixels[row * self.width + x0..row * self.width + x1].fill(colour);
        }
    }

    fn blend(&mut self, x: i64, y: i64, colour: u32, coverage: u8) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 || coverage == 0 {
            return;
        }
        let idx = y as usize * self.width + x as usize;
        let dst = self.pixels[idx];
        let a = u32::from(coverage);
        let mix = |shift: u32| {
            let s = (colour >> shift) & 0xFF;
            let d = (dst >> shift) & 0xFF;
            ((s * a + d * (255 - a)) / 255) << shift
        };
        self.pixels[idx] = 0xFF00_0000 | mix(16) | mix(8) | mix(0);
    }

    /// Draws one line of text with its baseline at `baseline`; returns the
    /// x after the last glyph. Text beyond `max_x` is not drawn.
    pub fn draw_text(
        &mut self,
        font: &fontdue::Font,
        style: Style,
        x: i64,
        baseline: i64,
        max_x: i64,
        text: &str,
    ) -> i64 {
        let Style { size, colour } = style;
        let mut pen = x as f32;
        for ch in text.chars() {
            let (m, bitmap) = font.rasterize(ch, size);
            if pen as i64 + m.width as i64 > max_x {
                break;
            }
            let gx = pen as i64 + i64::from(m.xmin);
            let gy = baseline - i64::from(m.ymin) - m.height as i64;
            for row in 0..m.height {
                for col in 0..m.width {
                    self.blend(
                        gx + col as i64,
                        gy + row as i64,
                        colour,
                        bitmap[row * m.width + col],
                    );
                }
            }
            pen += m.advance_width;
        }
        pen as i64
    }

    /// Bytes in little-endian ARGB8888, as `wl_shm` expects.
    pub fn write_argb8888_le(&self, out: &mut [u8]) {
        for (dst, px) in out.chunks_exact_mut(4).zip(&self.pixels) {
            dst.copy_from_slice(&px.to_le_bytes());
        }
    }
}

const MARGIN: i64 = 24;
pub const BAR_TOP: i64 = 64;
pub const BAR_HEIGHT: i64 = 48;
const PLACEHOLDER: &str = "Say what you want: open a terminal, list my files, run notepad.exe…";

/// Draws the whole shell: title, intent bar, results (newest first).
pub fn draw(view: &View, canvas: &mut Canvas, font: &fontdue::Font) {
    let (w, h) = (canvas.width as i64, canvas.height as i64);
    canvas.fill_rect(0, 0, w, h, BACKGROUND);
    let right = w - MARGIN;
    let end = canvas.draw_text(font, style(26.0, TEXT), MARGIN, 44, right, "Clay");
    canvas.draw_text(
        font,
        style(15.0, MUTED),
        end + 14,
        44,
        right,
        "the Kiln desktop shell",
    );

    // The intent bar: accent border, darker fill, text or placeholder, caret.
    canvas.fill_rect(MARGIN, BAR_TOP, w - 2 * MARGIN, BAR_HEIGHT, ACCENT);
    canvas.fill_rect(
        MARGIN + 2,
        BAR_TOP + 2,
        w - 2 * MARGIN - 4,
        BAR_HEIGHT - 4,
        BAR_FILL,
    );
    let text_x = MARGIN + 14;
    let baseline = BAR_TOP + 32;
    let caret_x = if view.input.is_empty() {
        canvas.draw_text(
            font,
            style(18.0, MUTED),
            text_x,
            baseline,
            right - 14,
            PLACEHOLDER,
        );
        text_x
    } else {
        // Show the end of long input, where the user is typing.
        let visible = tail_that_fits(font, 20.0, &view.input, (right - 14 - text_x - 8) as f32);
        canvas.draw_text(
            font,
            style(20.0, TEXT),
            text_x,
            baseline,
            right - 14,
            visible,
        )
    };
    canvas.fill_rect(caret_x + 2, BAR_TOP + 12, 2, BAR_HEIGHT - 24, ACCENT);

    // Results.
    let mut y = BAR_TOP + BAR_HEIGHT + 36;
    for entry in &view.entries {
        if y > h {
            break;
        }
        canvas.draw_text(
            font,
            style(17.0, ACCENT),
            MARGIN,
            y,
            right,
            &format!("› {}", entry.request),
        );
        y += 24;
        canvas.draw_text(
            font,
            style(17.0, if entry.ok { GOOD } else { BAD }),
            MARGIN + 18,
            y,
            right,
            &entry.summary,
        );
        y += 22;
        for line in &entry.details {
            if y > h {
                break;
            }
            canvas.draw_text(font, style(15.0, MUTED), MARGIN + 36, y, right, line);
            y += 20;
        }
        y += 16;
    }
}

fn tail_that_fits<'a>(font: &fontdue::Font, size: f32, text: &'a str, width: f32) -> &'a str {
    let mut used = 0.0;
    for (idx, ch) in text.char_indices().rev() {
        used += font.metrics(ch, size).advance_width;
        if used > width {
            return &text[idx + ch.len_utf8()..];
        }
    }
    text
}
