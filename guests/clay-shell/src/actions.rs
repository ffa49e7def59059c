//! What each intent does. Quick questions are answered at once; programs are
//! started detached, and a console Windows program's output is reported
//! when it finishes.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;

use crate::intent::Intent;

/// Output of a finished console program kept for display.
const MAX_CAPTURE: usize = 16 * 1024;
/// Directory entries shown for "list my files".
const MAX_LISTED: usize = 200;

/// Where things are in this guest; overridable for tests and other images.
#[derive(Debug, Clone)]
pub struct ActionContext {
    pub home: PathBuf,
    /// Terminal emulator argv (Wayland-native; `foot` in the Clay image).
    pub terminal: Vec<String>,
    pub wine: PathBuf,
    pub wine_prefix: Option<PathBuf>,
    /// Searched for bare `.exe` names before handing them to Wine as-is.
    pub windows_app_dirs: Vec<PathBuf>,
}

impl ActionContext {
    pub fn from_env() -> ActionContext {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/"));
        let terminal = std::env::var("CLAY_TERMINAL")
            .ok()
            .map(|t| t.split_whitespace().map(String::from).collect::<Vec<_>>())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| vec!["foot".into()]);
        ActionContext {
            windows_app_dirs: vec![home.clone(), PathBuf::from("/opt/windows-apps")],
            home,
            terminal,
            wine: PathBuf::from("wine"),
            wine_prefix: std::env::var_os("WINEPREFIX").map(PathBuf::from),
        }
    }
}

/// What happened, for the results surface.
#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    pub summary: String,
    pub details: Vec<String>,
    /// A later update (e.g. a console program's output when it exits).
    pub follow_up: Option<Receiver<Outcome>>,
}

impl Outcome {
    fn ok(summary: impl Into<String>, details: Vec<String>) -> Outcome {
        Outcome {
            ok: true,
            summary: summary.into(),
            details,
            follow_up: None,
        }
    }
    fn failed(summary: impl Into<String>) -> Outcome {
        Outcome {
            ok: false,
            summary: summary.into(),
            details: Vec::new(),
            follow_up: None,
        }
    }
}

pub fn perform(intent: &Intent, ctx: &ActionContext) -> Outcome {
    match intent {
        Intent::Empty => Outcome::ok("Type what you want, then press Enter.", vec![]),
        Intent::Help => Outcome::ok("Things you can ask for:", help_lines()),
        Intent::OpenTerminal => open_terminal(ctx),
        Intent::MemoryFree => memory_free(),
        Intent::DiskFree => disk_free(Path::new("/")),
        Intent::CpuLoad => cpu_load(),
        Intent::Uptime => uptime(),
        Intent::CurrentTime => current_time(),
        Intent::ListFiles { dir } => list_files(&resolve_dir(dir.as_deref(), &ctx.home)),
        Intent::RunWindowsApp { exe, args } => run_windows_app(exe, args, ctx),
        Intent::Launch { program, args } => launch(program, args),
        Intent::Unknown { text } => Outcome::failed(format!(
            "I don't know how to do \"{}\". Type \"help\" for examples.",
            shorten(text, 80)
        )),
    }
}

pub fn help_lines() -> Vec<String> {
    [
        "open a terminal",
        "how much memory is free",
        "how much disk space is left",
        "is the cpu busy / uptime / what time is it",
        "list my files / what's in /tmp",
        "run notepad.exe / run hello.exe arg1 arg2",
        "open <program> [arguments]",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn spawn_detached(argv: &[String], envs: &[(&str, &Path)]) -> Result<u32, String> {
    let (program, args) = argv.split_first().ok_or("nothing to run")?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let pid = child.id();
    // Reap it when it exits so no zombie is left behind.
    thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

fn open_terminal(ctx: &ActionContext) -> Outcome {
    match spawn_detached(&ctx.terminal, &[]) {
        Ok(pid) => Outcome::ok(
            format!("Opened a terminal ({}, pid {pid}).", ctx.terminal[0]),
            vec![],
        ),
        Err(e) => Outcome::failed(e),
    }
}

fn read_meminfo() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("MemAvailable")?, field("MemTotal")?))
}

fn memory_free() -> Outcome {
    match read_meminfo() {
        Some((avail, total)) if total > 0 => Outcome::ok(
            format!(
                "{} of {} memory is free.",
                human_bytes(avail),
                human_bytes(total)
            ),
            vec![format!(
                "{:.0}% available",
                avail as f64 * 100.0 / total as f64
            )],
        ),
        _ => Outcome::failed("Cannot read /proc/meminfo."),
    }
}

fn disk_free(path: &Path) -> Outcome {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return Outcome::failed("invalid path");
    };
    // SAFETY: statvfs is plain old data and c_path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Outcome::failed(format!(
            "Cannot query {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let frsize = st.f_frsize as u64;
    let free = st.f_bavail as u64 * frsize;
    let total = st.f_blocks as u64 * frsize;
    Outcome::ok(
        format!(
            "{} of {} free on {}.",
            human_bytes(free),
            human_bytes(total),
            path.display()
        ),
        vec![],
    )
}

fn cpu_load() -> Outcome {
    let cpus = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    match std::fs::read_to_string("/proc/loadavg") {
        Ok(text) => {
            let parts: Vec<&str> = text.split_whitespace().collect();
            let one: f64 = parts.first().and_then(|s| s.parse().ok()).unwrap_or(0.0);
            let verdict = if one < cpus as f64 * 0.5 {
                "mostly idle"
            } else if one < cpus as f64 {
                "busy"
            } else {
                "overloaded"
            };
            Outcome::ok(
                format!("The CPU is {verdict}: load {one:.2} on {cpus} CPU(s)."),
                vec![format!(
                    "load averages 1/5/15 min: {}",
                    parts.get(..3).map(|p| p.join(" ")).unwrap_or_default()
                )],
            )
        }
        Err(e) => Outcome::failed(format!("Cannot read /proc/loadavg: {e}")),
    }
}

pub fn format_duration(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (d, h) {
        (0, 0) => format!("{m} min {} s", secs % 60),
        (0, _) => format!("{h} h {m} min"),
        _ => format!("{d} d {h} h {m} min"),
    }
}

fn uptime() -> Outcome {
    let secs = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok());
    match secs {
        Some(s) => Outcome::ok(format!("Up for {}.", format_duration(s as u64)), vec![]),
        None => Outcome::failed("Cannot read /proc/uptime."),
    }
}

fn current_time() -> Outcome {
    // SAFETY: time/localtime_r/strftime with valid, sized buffers.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Outcome::failed("Cannot read the clock.");
        }
        let mut buf = [0u8; 64];
        let fmt = c"%A %d %B %Y, %H:%M:%S %Z";
        let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm);
        Outcome::ok(
            format!("It is {}.", String::from_utf8_lossy(&buf[..n])),
            vec![],
        )
    }
}

/// `None` → home; `~` and `~/x` → under home; relative → under home.
pub fn resolve_dir(dir: Option<&str>, home: &Path) -> PathBuf {
    match dir {
        None => home.to_path_buf(),
        Some("~") => home.to_path_buf(),
        Some(d) => match d.strip_prefix("~/") {
            Some(rest) => home.join(rest),
            None if d.starts_with('/') => PathBuf::from(d),
            None => home.join(d),
        },
    }
}

pub fn list_files(dir: &Path) -> Outcome {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return Outcome::failed(format!("Cannot list {}: {e}", dir.display())),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| {
            let mut name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                name.push('/');
            }
            name
        })
        .collect();
    names.sort_unstable_by_key(|n| n.to_lowercase());
    let total = names.len();
    let summary = match total {
        0 => format!("{} is empty.", dir.display()),
        1 => format!("1 entry in {}:", dir.display()),
        n => format!("{n} entries in {}:", dir.display()),
    };
    let mut details: Vec<String> = names.into_iter().take(MAX_LISTED).collect();
    if total > MAX_LISTED {
        details.push(format!("… and {} more", total - MAX_LISTED));
    }
    Outcome::ok(summary, details)
}

/// A bare name is looked up in the app directories; otherwise Wine gets it
/// as typed (it knows Windows paths and its builtin programs like notepad).
pub fn resolve_exe(exe: &str, dirs: &[PathBuf]) -> String {
    if exe.contains('/') || exe.contains('\\') || exe.contains(':') {
        return exe.to_string();
    }
    dirs.iter()
        .map(|d| d.join(exe))
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| exe.to_string())
}

fn run_windows_app(exe: &str, args: &[String], ctx: &ActionContext) -> Outcome {
    let target = resolve_exe(exe, &ctx.windows_app_dirs);
    let mut cmd = Command::new(&ctx.wine);
    cmd.arg(&target)
        .args(args)
        .env("WINEDEBUG", "-all")
        .env("WINEDLLOVERRIDES", "mscoree=;mshtml=");
    if let Some(prefix) = &ctx.wine_prefix {
        cmd.env("WINEPREFIX", prefix);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Outcome::failed(format!("Cannot start Wine ({}): {e}", ctx.wine.display()))
        }
    };
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let name = exe.to_string();
    thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut so) = child.stdout.take() {
            let _ = (&mut so).take(MAX_CAPTURE as u64).read_to_end(&mut out);
            // Keep draining so a chatty program never blocks on a full pipe.
            let _ = std::io::copy(&mut so, &mut std::io::sink());
        }
        let status = child.wait();
        let mut details: Vec<String> = String::from_utf8_lossy(&out)
            .lines()
            .map(|l| l.trim_end().to_string())
            .collect();
        if details.len() > MAX_LISTED {
            details.truncate(MAX_LISTED);
            details.push("…".into());
        }
        let outcome = match status {
            Ok(st) if st.success() => Outcome::ok(format!("{name} finished."), details),
            Ok(st) => Outcome {
                ok: false,
                summary: format!("{name} ended: {st}."),
                details,
                follow_up: None,
            },
            Err(e) => Outcome::failed(format!("{name}: {e}")),
        };
        let _ = tx.send(outcome);
    });
    Outcome {
        ok: true,
        summary: format!("Started {exe} under Wine (pid {pid})."),
        details: vec![format!("wine {target} {}", args.join(" "))
            .trim_end()
            .to_string()],
        follow_up: Some(rx),
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").map(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })?
}

fn launch(program: &str, args: &[String]) -> Outcome {
    let Some(path) = find_in_path(program) else {
        return Outcome::failed(format!("There is no program called \"{program}\" here."));
    };
    let mut argv = vec![path.to_string_lossy().into_owned()];
    argv.extend(args.iter().cloned());
    match spawn_detached(&argv, &[]) {
        Ok(pid) => Outcome::ok(format!("Started {program} (pid {pid})."), vec![]),
        Err(e) => Outcome::failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ctx(home: &Path) -> ActionContext {
        ActionContext {
            home: home.to_path_buf(),
            terminal: vec!["true".into()],
            wine: PathBuf::from("/nonexistent/wine"),
            wine_prefix: None,
            windows_app_dirs: vec![home.to_path_buf()],
        }
    }

    #[test]
    fn list_files_sorts_marks_directories_and_reports_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("b.txt"), b"").expect("write");
        std::fs::write(dir.path().join("A.txt"), b"").expect("write");
        std::fs::create_dir(dir.path().join("docs")).expect("mkdir");
        let out = perform(&Intent::ListFiles { dir: None }, &ctx(dir.path()));
        assert!(out.ok);
        assert_eq!(out.details, vec!["A.txt", "b.txt", "docs/"]);
        assert!(out.summary.starts_with("3 entries"));
        let sub = perform(
            &Intent::ListFiles {
                dir: Some("docs".into()),
            },
            &ctx(dir.path()),
        );
        assert!(sub.ok && sub.summary.contains("is empty"), "{sub:?}");
        let missing = perform(
            &Intent::ListFiles {
                dir: Some("/nonexistent/x".into()),
            },
            &ctx(dir.path()),
        );
        assert!(!missing.ok && missing.summary.contains("Cannot list"));
    }

    #[test]
    fn system_answers_come_from_this_machine() {
        let dir = tempfile::tempdir().expect("tempdir");
        for intent in [
            Intent::MemoryFree,
            Intent::DiskFree,
            Intent::CpuLoad,
            Intent::Uptime,
            Intent::CurrentTime,
            Intent::Help,
        ] {
            let out = perform(&intent, &ctx(dir.path()));
            assert!(out.ok, "{intent:?}: {out:?}");
        }
        assert!(perform(&Intent::MemoryFree, &ctx(dir.path()))
            .summary
            .contains("memory is free"));
    }

    #[test]
    fn launching_programs_and_terminals() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(perform(&Intent::OpenTerminal, &ctx(dir.path())).ok);
        let mut bad = ctx(dir.path());
        bad.terminal = vec!["/nonexistent/foot".into()];
        assert!(!perform(&Intent::OpenTerminal, &bad).ok);
        assert!(
            perform(
                &Intent::Launch {
                    program: "true".into(),
                    args: vec![]
                },
                &ctx(dir.path())
            )
            .ok
        );
        let missing = perform(
            &Intent::Launch {
                program: "no-such-program-kiln".into(),
                args: vec![],
            },
            &ctx(dir.path()),
        );
        assert!(!missing.ok && missing.summary.contains("no program"));
    }

    #[test]
    fn windows_apps_are_resolved_and_reported_when_done() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("hello.exe"), b"MZ").expect("write");
        let dirs = vec![dir.path().to_path_buf()];
        assert_eq!(
            resolve_exe("hello.exe", &dirs),
            dir.path().join("hello.exe").to_string_lossy()
        );
        assert_eq!(resolve_exe("notepad.exe", &dirs), "notepad.exe");
        assert_eq!(resolve_exe("C:\\x\\y.exe", &dirs), "C:\\x\\y.exe");

        // A launcher script stands in for wine to check what Clay passes it.
        let launcher = dir.path().join("wine");
        std::fs::write(&launcher, "#!/bin/sh\necho \"ran $1 with $2\"\nexit 3\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut c = ctx(dir.path());
        c.wine = launcher;
        let started = perform(
            &Intent::RunWindowsApp {
                exe: "hello.exe".into(),
                args: vec!["x".into()],
            },
            &c,
        );
        assert!(started.ok, "{started:?}");
        let done = started
            .follow_up
            .expect("follow-up")
            .recv_timeout(Duration::from_secs(10))
            .expect("finished");
        assert!(!done.ok);
        assert_eq!(
            done.details,
            vec![format!(
                "ran {} with x",
                dir.path().join("hello.exe").display()
            )]
        );
        let no_wine = perform(
            &Intent::RunWindowsApp {
                exe: "a.exe".into(),
                args: vec![],
            },
            &ctx(dir.path()),
        );
        assert!(!no_wine.ok && no_wine.summary.contains("Cannot start Wine"));
    }

    #[test]
    fn helpers() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(format_duration(59), "0 min 59 s");
        assert_eq!(format_duration(3 * 3600 + 120), "3 h 2 min");
        assert_eq!(format_duration(2 * 86_400 + 3600), "2 d 1 h 0 min");
        let home = Path::new("/home/clay");
        assert_eq!(
            resolve_dir(Some("~/src"), home),
            Path::new("/home/clay/src")
        );
        assert_eq!(
            resolve_dir(Some("Documents"), home),
            Path::new("/home/clay/Documents")
        );
        assert_eq!(resolve_dir(Some("/tmp"), home), Path::new("/tmp"));
    }
}
