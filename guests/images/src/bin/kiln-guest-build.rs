//! `kiln-guest-build base|clay|wincompat`: builds a guest image (the same
//! library the `kiln guest build` command calls) and prints a size summary.

use std::path::PathBuf;
use std::process::ExitCode;

use kiln_images::{build_image, default_cache_dir, BuildOptions, ImageKind, StderrProgress};

fn usage() -> ExitCode {
    eprintln!(
        "usage: kiln-guest-build base|clay|wincompat --agent PATH [--clay-shell PATH] [--cache DIR] [--mirror URL] [--force] [--quiet]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let Some(kind) = args.next() else {
        return usage();
    };
    let kind: ImageKind = match kind.parse() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kiln-guest-build: {e}");
            return usage();
        }
    };
    let (mut agent, mut shell, mut cache, mut mirror, mut force, mut verbose) =
        (None, None, None, None, false, true);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--agent" => agent = args.next().map(PathBuf::from),
            "--clay-shell" => shell = args.next().map(PathBuf::from),
            "--cache" => cache = args.next().map(PathBuf::from),
            "--mirror" => mirror = args.next(),
            "--force" => force = true,
            "--quiet" => verbose = false,
            _ => return usage(),
        }
    }
    let Some(agent) = agent else { return usage() };
    let mut opts = BuildOptions::new(cache.unwrap_or_else(default_cache_dir), agent);
    opts.clay_shell_binary = shell;
    opts.force = force;
    if let Some(m) = mirror {
        opts.mirror = m;
    }
    match build_image(kind, &opts, &StderrProgress::new(verbose)) {
        Ok(a) => {
            print!("{}", a.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kiln-guest-build: building the {kind} image failed: {e}");
            ExitCode::FAILURE
        }
    }
}
