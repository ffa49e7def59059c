//! `kiln vm console NAME`: attached to the guest's serial console through
//! the API's WebSocket. On a terminal: raw mode, keys go to the guest,
//! Ctrl-] detaches. From a pipe: the piped bytes are typed, then the
//! console stays attached until `--until`'s marker, `--timeout`, or (with
//! neither) a moment after the input ended.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_api::Client;
use tokio::sync::mpsc;

/// Ctrl-]: detaches (as telnet and virsh console do).
const DETACH: u8 = 0x1d;
/// After piped input ends (and no marker is awaited): how long output is
/// still shown.
const AFTER_INPUT: Duration = Duration::from_millis(1500);

#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    pub name: String,
    /// Print the console log (the last MiB) instead of attaching.
    #[arg(long)]
    pub log: bool,
    /// Exit 0 once MARKER appears in the console output (exit 1 if the
    /// console closes or --timeout passes first).
    #[arg(long, value_name = "MARKER", conflicts_with = "log")]
    pub until: Option<String>,
    /// Give up (with --until: fail) after this many seconds.
    #[arg(long, value_name = "SECS", conflicts_with = "log")]
    pub timeout: Option<u64>,
}

/// Puts the terminal in raw mode (no echo, no line editing, no signals:
/// Ctrl-C goes to the guest) and restores it when dropped.
struct RawMode(libc::termios);

impl RawMode {
    fn enable() -> Option<RawMode> {
        // SAFETY: isatty/tcgetattr/tcsetattr on stdin with a termios we own.
        unsafe {
            if libc::isatty(libc::STDIN_FILENO) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawMode(saved))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved by `enable`.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0);
        }
    }
}

/// Stdin on a thread of its own (a blocking read cannot hold up the exit):
/// chunks, then `None` at its end.
fn stdin_chunks() -> mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Finds `marker` in output that arrives in pieces.
struct Marker {
    marker: Vec<u8>,
    window: Vec<u8>,
}

impl Marker {
    fn new(marker: &str) -> Marker {
        Marker {
            marker: marker.as_bytes().to_vec(),
            window: Vec::new(),
        }
    }

    fn seen_in(&mut self, chunk: &[u8]) -> bool {
        self.window.extend_from_slice(chunk);
        let m = self.marker.len();
        let found = m == 0 || self.window.windows(m).any(|w| w == self.marker.as_slice());
        let keep = m.saturating_sub(1);
        let excess = self.window.len().saturating_sub(keep);
        self.window.drain(..excess);
        found
    }
}

enum End {
    Detached,
    Closed,
    MarkerSeen,
    TimedOut,
}

pub async fn attach(client: &Client, args: &ConsoleArgs) -> Result<()> {
    let session = client.attach_console(&args.name).await?;
    let (mut input, mut output) = session.split();
    let raw = RawMode::enable();
    if raw.is_some() {
        eprint!(
            "Attached to {}'s serial console; Ctrl-] detaches.\r\n",
            args.name
        );
    }
    let mut marker = args.until.as_deref().map(Marker::new);
    let mut keys = stdin_chunks();
    let mut stdin_open = true;
    let timeout = args.timeout.map(Duration::from_secs);
    let deadline =
        tokio::time::Instant::now() + timeout.unwrap_or(Duration::from_secs(u64::MAX >> 2));
    // Set once piped input ended and nothing else keeps us attached.
    let mut linger: Option<tokio::time::Instant> = None;
    let mut stdout = std::io::stdout();
    let end = loop {
        let linger_at = linger.unwrap_or(deadline);
        tokio::select! {
            out = output.next() => match out? {
                Some(bytes) => {
                    stdout.write_all(&bytes).context("writing to stdout")?;
                    stdout.flush().context("writing to stdout")?;
                    if marker.as_mut().is_some_and(|m| m.seen_in(&bytes)) {
                        break End::MarkerSeen;
                    }
                }
                None => break End::Closed,
            },
            chunk = keys.recv(), if stdin_open => match chunk.flatten() {
                Some(bytes) => {
                    let cut = if raw.is_some() {
                        bytes.iter().position(|&b| b == DETACH)
                    } else {
                        None
                    };
                    let typed = &bytes[..cut.unwrap_or(bytes.len())];
                    if !typed.is_empty() {
                        input.send(typed).await?;
                    }
                    if cut.is_some() {
                        break End::Detached;
                    }
                }
                None => {
                    stdin_open = false;
                    if marker.is_none() {
                        linger = Some(tokio::time::Instant::now() + AFTER_INPUT);
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline) => break End::TimedOut,
            _ = tokio::time::sleep_until(linger_at), if linger.is_some() => break End::Detached,
        }
    };
    let _ = input.close().await;
    let was_raw = raw.is_some();
    drop(raw);
    if was_raw && matches!(end, End::Detached) {
        eprintln!("\ndetached from {}'s console", args.name);
    }
    match end {
        End::MarkerSeen | End::Detached => {}
        End::TimedOut if marker.is_none() => {}
        End::TimedOut => bail!(
            "{:?} did not appear on {}'s console within {} s",
            args.until.as_deref().unwrap_or_default(),
            args.name,
            args.timeout.unwrap_or_default()
        ),
        End::Closed if marker.is_some() => bail!(
            "{}'s console closed (the VM stopped?) before {:?} appeared",
            args.name,
            args.until.as_deref().unwrap_or_default()
        ),
        End::Closed => eprintln!("\r\n{}'s console closed (the VM stopped?)\r", args.name),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_split_across_chunks_is_found_once_whole() {
        let mut m = Marker::new("KILN_42");
        assert!(!m.seen_in(b"echo KILN_$((40+2))\r\nKIL"));
        assert!(!m.seen_in(b"N_4"));
        assert!(m.seen_in(b"2\r\n/ # "));
        let mut m = Marker::new("hi");
        assert!(!m.seen_in(b"h"));
        assert!(!m.seen_in(b"x"));
        assert!(!m.seen_in(b"i"));
    }
}
