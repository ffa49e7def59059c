//! The rule-based intent parser: maps what the user typed in the intent bar
//! to one action. Rules look at words, not exact sentences, so "open a
//! terminal", "terminal please" and "can you start a shell?" all match.

use serde::Serialize;

/// Longest request considered; anything beyond is cut off (the intent bar
/// is one line, and the parser should never be slowed by a huge paste).
pub const MAX_INPUT_CHARS: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "intent", rename_all = "snake_case")]
pub enum Intent {
    OpenTerminal,
    MemoryFree,
    DiskFree,
    CpuLoad,
    Uptime,
    CurrentTime,
    /// List a directory; `None` means the user's home.
    ListFiles {
        dir: Option<String>,
    },
    /// Run a Windows program under Wine.
    RunWindowsApp {
        exe: String,
        args: Vec<String>,
    },
    /// Start a Linux program by name.
    Launch {
        program: String,
        args: Vec<String>,
    },
    Help,
    /// Nothing typed.
    Empty,
    /// Not understood; the original text is kept for the message (and for the
    /// optional language-model fallback).
    Unknown {
        text: String,
    },
}

/// Polite or filler words that carry no meaning for the rules.
const FILLER: &[&str] = &[
    "please", "pls", "can", "could", "would", "you", "i", "want", "to", "like", "me", "for", "the",
    "a", "an", "my", "some", "kindly", "just", "now", "hey", "clay", "id", "i'd", "lets", "let's",
];

const LAUNCH_VERBS: &[&str] = &["open", "launch", "start", "run", "execute", "exec", "spawn"];

/// Parses one request. Never panics, whatever the input.
pub fn parse(input: &str) -> Intent {
    let cleaned: String = input
        .chars()
        .take(MAX_INPUT_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let original: Vec<&str> = cleaned.split_whitespace().collect();
    if original.is_empty() {
        return Intent::Empty;
    }
    let words: Vec<String> = original.iter().map(|w| normalise_word(w)).collect();
    let has = |w: &str| words.iter().any(|x| x == w);
    let has_any = |ws: &[&str]| ws.iter().any(|w| has(w));

    // A Windows program named anywhere wins: "run notepad.exe", "start
    // C:\\Games\\x.exe -fast", "please open hello.exe".
    if let Some(pos) = original.iter().position(|w| is_exe(w)) {
        let exe = trim_quotes(original[pos]).to_string();
        let args = original[pos + 1..]
            .iter()
            .map(|a| trim_quotes(a).to_string())
            .collect();
        return Intent::RunWindowsApp { exe, args };
    }
    if has_any(&["help", "?", "commands"]) || phrase(&words, &["what", "can", "you", "do"]) {
        return Intent::Help;
    }
    if has_any(&["terminal", "shell", "console", "xterm", "foot", "tty"]) {
        return Intent::OpenTerminal;
    }
    if has_any(&["memory", "ram", "mem"]) {
        return Intent::MemoryFree;
    }
    if has_any(&["disk", "storage", "space", "df"]) {
        return Intent::DiskFree;
    }
    if has_any(&["cpu", "load", "busy", "processor"]) {
        return Intent::CpuLoad;
    }
    if has("uptime") || phrase(&words, &["how", "long"]) && has_any(&["running", "up", "on"]) {
        return Intent::Uptime;
    }
    if has_any(&["time", "date", "clock", "day"]) {
        return Intent::CurrentTime;
    }
    if has_any(&[
        "files",
        "file",
        "ls",
        "folder",
        "directory",
        "dir",
        "documents",
        "list",
    ]) || phrase(&words, &["what's", "in"])
        || phrase(&words, &["whats", "in"])
    {
        return Intent::ListFiles {
            dir: list_target(&original, &words),
        };
    }
    // "open firefox", "launch foot --server": a program by name.
    let meaningful: Vec<usize> = (0..words.len())
        .filter(|&i| !FILLER.contains(&words[i].as_str()))
        .collect();
    if let Some((&first, rest)) = meaningful.split_first() {
        if LAUNCH_VERBS.contains(&words[first].as_str()) {
            if let Some(&prog) = rest.first() {
                let program = trim_quotes(original[prog]).to_string();
                if is_program_name(&program) {
                    let args = original[prog + 1..]
                        .iter()
                        .map(|a| trim_quotes(a).to_string())
                        .collect();
                    return Intent::Launch { program, args };
                }
            }
        }
    }
    Intent::Unknown {
        text: cleaned.trim().to_string(),
    }
}

/// Lower case, without surrounding punctuation ("Terminal?" → "terminal").
fn normalise_word(w: &str) -> String {
    w.trim_matches(|c: char| {
        !c.is_alphanumeric() && c != '\'' && c != '/' && c != '~' && c != '?' && c != '.'
    })
    .trim_end_matches(['.', ',', '!'])
    .trim_end_matches(|c: char| c == '?' && w.len() > 1)
    .to_lowercase()
}

fn trim_quotes(w: &str) -> &str {
    w.trim_matches(|c| c == '"' || c == '\'')
}

fn is_exe(w: &str) -> bool {
    let w = trim_quotes(w).trim_end_matches([',', '!', '?']);
    w.len() > 4 && w.to_ascii_lowercase().ends_with(".exe")
}

/// Words that can be a program name: no shell syntax, no path traversal
/// tricks beyond a plain absolute path.
fn is_program_name(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with(['.', '-'])
        && p.len() <= 255
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+/".contains(c))
        && !p.contains("..")
}

/// True if `needle` occurs as consecutive words.
fn phrase(words: &[String], needle: &[&str]) -> bool {
    words
        .windows(needle.len())
        .any(|w| w.iter().zip(needle).all(|(a, b)| a == b))
}

/// The directory named in a list request: an explicit path, or the word after
/// "in"/"of"/"under", with "home" meaning the user's home.
fn list_target(original: &[&str], words: &[String]) -> Option<String> {
    if let Some(p) = original
        .iter()
        .map(|w| trim_quotes(w).trim_end_matches(['?', '!', ',']))
        .find(|w| w.starts_with('/') || w.starts_with('~'))
    {
        return Some(p.to_string());
    }
    let pos = words
        .iter()
        .position(|w| w == "in" || w == "of" || w == "under")?;
    let next = (pos + 1..words.len()).find(|&i| !FILLER.contains(&words[i].as_str()))?;
    match words[next].as_str() {
        "home" | "here" => None,
        _ => Some(
            trim_quotes(original[next])
                .trim_end_matches(['?', '!', ',', '.'])
                .to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exe(e: &str, args: &[&str]) -> Intent {
        Intent::RunWindowsApp {
            exe: e.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn open_terminal() {
        for s in [
            "open a terminal",
            "Terminal",
            "can you start a shell?",
            "new console please",
            "launch foot",
        ] {
            assert_eq!(parse(s), Intent::OpenTerminal, "{s}");
        }
    }

    #[test]
    fn memory_free() {
        for s in [
            "how much memory is free",
            "free RAM?",
            "Memory usage",
            "how much mem do I have",
        ] {
            assert_eq!(parse(s), Intent::MemoryFree, "{s}");
        }
    }

    #[test]
    fn run_windows_programs_keep_case_and_arguments() {
        assert_eq!(parse("run notepad.exe"), exe("notepad.exe", &[]));
        assert_eq!(
            parse("please start Hello.EXE one \"two\""),
            exe("Hello.EXE", &["one", "two"])
        );
        assert_eq!(
            parse("run C:\\Games\\Game.exe -fast"),
            exe("C:\\Games\\Game.exe", &["-fast"])
        );
        assert_eq!(
            parse("/opt/apps/kiln-console-test.exe"),
            exe("/opt/apps/kiln-console-test.exe", &[])
        );
        // ".exe" alone or inside a word is not a program.
        assert!(matches!(parse("run .exe"), Intent::Unknown { .. }));
        assert!(matches!(parse("what is an exe"), Intent::Unknown { .. }));
    }

    #[test]
    fn list_files_with_and_without_a_directory() {
        assert_eq!(parse("list my files"), Intent::ListFiles { dir: None });
        assert_eq!(
            parse("show files in /tmp"),
            Intent::ListFiles {
                dir: Some("/tmp".into())
            }
        );
        assert_eq!(
            parse("what's in Documents?"),
            Intent::ListFiles {
                dir: Some("Documents".into())
            }
        );
        assert_eq!(
            parse("ls ~/src"),
            Intent::ListFiles {
                dir: Some("~/src".into())
            }
        );
        assert_eq!(
            parse("list files in my home"),
            Intent::ListFiles { dir: None }
        );
    }

    #[test]
    fn system_questions() {
        assert_eq!(parse("how much disk space is left"), Intent::DiskFree);
        assert_eq!(parse("is the cpu busy"), Intent::CpuLoad);
        assert_eq!(parse("uptime"), Intent::Uptime);
        assert_eq!(parse("how long has it been running"), Intent::Uptime);
        assert_eq!(parse("what time is it"), Intent::CurrentTime);
        assert_eq!(parse("help"), Intent::Help);
        assert_eq!(parse("what can you do?"), Intent::Help);
    }

    #[test]
    fn launch_linux_programs_by_name() {
        assert_eq!(
            parse("open firefox"),
            Intent::Launch {
                program: "firefox".into(),
                args: vec![]
            }
        );
        assert_eq!(
            parse("please launch gedit notes.txt"),
            Intent::Launch {
                program: "gedit".into(),
                args: vec!["notes.txt".into()]
            }
        );
        // Shell syntax is never a program name.
        assert!(matches!(parse("run $(reboot)"), Intent::Unknown { .. }));
        assert!(matches!(parse("open ../../bin/sh"), Intent::Unknown { .. }));
    }

    #[test]
    fn odd_and_hostile_input() {
        assert_eq!(parse(""), Intent::Empty);
        assert_eq!(parse("   \t\n "), Intent::Empty);
        assert_eq!(
            parse("\u{0}\u{7}\u{1b}[2J"),
            Intent::Unknown { text: "[2J".into() }
        );
        assert!(matches!(parse("🦀🦀🦀"), Intent::Unknown { .. }));
        assert!(matches!(
            parse("colourless green ideas"),
            Intent::Unknown { .. }
        ));
        let long = "x".repeat(100_000);
        match parse(&long) {
            Intent::Unknown { text } => assert_eq!(text.chars().count(), MAX_INPUT_CHARS),
            other => panic!("{other:?}"),
        }
        // Multi-byte characters at the cut-off are not split.
        let _ = parse(&"é".repeat(5000));
        assert_eq!(
            parse("open"),
            Intent::Unknown {
                text: "open".into()
            }
        );
    }
}
