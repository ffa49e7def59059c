//! `kiln policy eval --report DIR`: a markdown report with PNG plots (guest
//! memory in force over time per policy, CDFs of LC run-queue wait and of I/O
//! latency). Text is drawn with a TrueType font from the system
//! (Debian's fonts-dejavu-core), registered at run time.

use crate::eval::{table, targets, PolicyResult};
use crate::sim::model::IO_SERVICE_US;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("report directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("no usable TrueType font for plot labels (install Debian's fonts-dejavu-core or set KILN_PLOT_FONT): {0}")]
    Font(String),
    #[error("drawing {path}: {msg}")]
    Draw { path: String, msg: String },
}

const FONT_CANDIDATES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

static FONT: OnceLock<Result<(), String>> = OnceLock::new();

fn register_font() -> Result<(), ReportError> {
    FONT.get_or_init(|| {
        let mut paths: Vec<PathBuf> = std::env::var_os("KILN_PLOT_FONT")
            .map(PathBuf::from)
            .into_iter()
            .collect();
        paths.extend(FONT_CANDIDATES.iter().map(PathBuf::from));
        let path = paths
            .iter()
            .find(|p| p.is_file())
            .ok_or_else(|| format!("none of {paths:?} exists"))?;
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Registered once per process and used until exit, so leaking is the intent.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable font", path.display()))
    })
    .clone()
    .map_err(ReportError::Font)
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn draw_err(path: &Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Draw {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

/// Lines of (x, y) per policy on one chart.
fn line_chart(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> Result<(), ReportError> {
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 >= x1 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 <= 0.0 { 1.0 } else { y1 * 1.05 };
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70);
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(xlabel)
                .y_desc(ylabel)
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(|e| draw_err(path, e))?;
            for (i, (name, pts)) in series.iter().enumerate() {
                let c = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(
                        pts.iter().map(|&(x, y)| (x, y)),
                        c.stroke_width(2),
                    ))
                    .map_err(|e| draw_err(path, e))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(|e| draw_err(path, e))?;
        }};
    }
    if log_x {
        let x0 = x0.max(1e-3);
        finish!(b
            .build_cartesian_2d((x0..x1.max(x0 * 10.0)).log_scale(), 0.0..y1)
            .map_err(|e| draw_err(path, e))?);
    } else {
        finish!(b
            .build_cartesian_2d(x0..x1, 0.0..y1)
            .map_err(|e| draw_err(path, e))?);
    }
    root.present().map_err(|e| draw_err(path, e))?;
    Ok(())
}

/// Empirical CDF of `values`, thinned to at most 400 points.
fn cdf(mut values: Vec<f64>) -> Vec<(f64, f64)> {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    let stride = (n / 400).max(1);
    (0..n)
        .step_by(stride)
        .chain(std::iter::once(n.saturating_sub(1)))
        .filter(|&i| i < n)
        .map(|i| (values[i], (i + 1) as f64 / n as f64))
        .collect()
}

/// CDF of per-request I/O latency for the exponential mixture the simulator models.
fn io_cdf(r: &PolicyResult) -> Vec<(f64, f64)> {
    let total: f64 = r.metrics.io_excess.iter().map(|e| e.1 as f64).sum();
    if total <= 0.0 {
        return Vec::new();
    }
    let p99 = r.metrics.io_p99_us();
    (0..=120)
        .map(|k| {
            let x = (p99 - IO_SERVICE_US) * 1.6 * k as f64 / 120.0;
            let tail: f64 = r
                .metrics
                .io_excess
                .iter()
                .map(|&(m, w)| w as f64 * (-x / (m as f64).max(1e-6)).exp())
                .sum::<f64>()
                / total;
            (IO_SERVICE_US + x, 1.0 - tail)
        })
        .collect()
}

/// Writes report.md, memory.png, lc_wait_cdf.png and io_latency_cdf.png into `dir`.
pub fn write_report(
    dir: &Path,
    header: &str,
    results: &[PolicyResult],
    notes: &[String],
) -> Result<PathBuf, ReportError> {
    register_font()?;
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let hours = |r: &PolicyResult, i: usize| i as f64 * r.metrics.step_s / 3600.0;
    let mem: Vec<(String, Vec<(f64, f64)>)> = results
        .iter()
        .map(|r| {
            let stride = (r.metrics.series_actual_mib.len() / 1000).max(1);
            let pts = r
                .metrics
                .series_actual_mib
                .iter()
                .enumerate()
                .step_by(stride)
                .map(|(i, &m)| (hours(r, i), m as f64 / 1024.0))
                .collect();
            (r.name.clone(), pts)
        })
        .chain(results.first().map(|r| {
            let stride = (r.metrics.series_ws_mib.len() / 1000).max(1);
            (
                "working set".to_string(),
                r.metrics
                    .series_ws_mib
                    .iter()
                    .enumerate()
                    .step_by(stride)
                    .map(|(i, &m)| (hours(r, i), m as f64 / 1024.0))
                    .collect(),
            )
        }))
        .collect();
    line_chart(
        &dir.join("memory.png"),
        "Guest memory in force (sum over VMs)",
        "hours",
        "GiB",
        &mem,
        false,
    )?;
    let waits: Vec<(String, Vec<(f64, f64)>)> = results
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                cdf(r
                    .metrics
                    .lc_wait_ms
                    .iter()
                    .map(|&x| x as f64 + 0.01)
                    .collect()),
            )
        })
        .collect();
    line_chart(
        &dir.join("lc_wait_cdf.png"),
        "Run-queue wait of latency-critical vCPUs (CDF)",
        "ms per s (+0.01, log)",
        "fraction",
        &waits,
        true,
    )?;
    let io: Vec<(String, Vec<(f64, f64)>)> = results
        .iter()
        .map(|r| (r.name.clone(), io_cdf(r)))
        .collect();
    line_chart(
        &dir.join("io_latency_cdf.png"),
        "I/O request latency (CDF)",
        "us",
        "fraction",
        &io,
        false,
    )?;

    let mut md = String::new();
    md.push_str("# kiln policy eval report\n\n");
    md.push_str(header);
    md.push_str("\n\n```\n");
    md.push_str(&table(results));
    md.push_str("```\n\n## Targets\n\n");
    for t in targets(results) {
        md.push_str(&format!("- {t}\n"));
    }
    if !notes.is_empty() {
        md.push_str("\n## Guardrail interventions\n\n");
        for n in notes {
            md.push_str(&format!("- {n}\n"));
        }
    }
    md.push_str("\n## Plots\n\n![memory](memory.png)\n\n![LC run-queue wait](lc_wait_cdf.png)\n\n![I/O latency](io_latency_cdf.png)\n");
    let path = dir.join("report.md");
    std::fs::write(&path, md).map_err(|source| ReportError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::run_policy;
    use crate::host::Host;
    use crate::tracegen::{generate, GenSpec};

    /// Needs a TrueType font (Debian: fonts-dejavu-core); fails saying so otherwise.
    #[test]
    fn writes_markdown_and_three_pngs() {
        let host = Host::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/host-32.toml"),
        )
        .unwrap();
        let trace = generate(&GenSpec {
            vms: 6,
            hours: 1.0,
            ..GenSpec::default()
        })
        .unwrap();
        let results: Vec<PolicyResult> = ["static", "mom"]
            .iter()
            .map(|n| run_policy(&host, &trace, &mut crate::policies::baseline(n).unwrap()).unwrap())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let md = write_report(dir.path(), "test", &results, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(std::fs::read_to_string(md)
            .unwrap()
            .contains("![memory](memory.png)"));
        for png in ["memory.png", "lc_wait_cdf.png", "io_latency_cdf.png"] {
            let bytes = std::fs::read(dir.path().join(png)).unwrap();
            assert!(
                bytes.len() > 5000 && bytes.starts_with(b"\x89PNG"),
                "{png} is a real image"
            );
        }
    }
}
