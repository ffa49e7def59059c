//! The shell's state machine: typing into the intent bar, submitting a
//! request, and collecting results (including ones that arrive later).

use std::sync::mpsc::{Receiver, TryRecvError};

use crate::actions::{self, ActionContext, Outcome};
use crate::intent;
use crate::llm::{self, LlmConfig};
use crate::render::{Entry, View};

/// Results kept on screen.
const MAX_ENTRIES: usize = 50;
/// Longest request the bar accepts (the parser looks at fewer characters).
const MAX_INPUT: usize = 2000;

pub struct Shell {
    pub view: View,
    ctx: ActionContext,
    pending: Vec<(String, Receiver<Outcome>)>,
    llm: Option<LlmConfig>,
}

impl Shell {
    pub fn new(ctx: ActionContext) -> Shell {
        Shell {
            view: View::default(),
            ctx,
            pending: Vec::new(),
            llm: None,
        }
    }

    /// Sends requests the rules do not understand to a language model
    /// (off unless configured).
    pub fn with_llm(mut self, llm: Option<LlmConfig>) -> Shell {
        self.llm = llm;
        self
    }

    /// Appends typed text; control characters are dropped.
    pub fn type_text(&mut self, text: &str) {
        for c in text.chars().filter(|c| !c.is_control()) {
            if self.view.input.chars().count() >= MAX_INPUT {
                break;
            }
            self.view.input.push(c);
        }
    }

    pub fn backspace(&mut self) {
        self.view.input.pop();
    }

    pub fn clear(&mut self) {
        self.view.input.clear();
    }

    /// Parses and carries out the request in the bar.
    pub fn submit(&mut self) {
        let request = std::mem::take(&mut self.view.input);
        let parsed = intent::parse(&request);
        tracing::info!(request = %request, intent = ?parsed, "request");
        if parsed == intent::Intent::Empty {
            return;
        }
        if let (intent::Intent::Unknown { .. }, Some(cfg)) = (&parsed, &self.llm) {
            let (tx, rx) = std::sync::mpsc::channel();
            let (cfg, ctx, text) = (cfg.clone(), self.ctx.clone(), request.clone());
            std::thread::spawn(move || {
                let outcome = match llm::interpret(&cfg, &text) {
                    Ok(intent) => actions::perform(&intent, &ctx),
                    Err(e) => Outcome {
                        ok: false,
                        summary: format!("The language model could not help: {e}"),
                        details: vec![],
                        follow_up: None,
                    },
                };
                let _ = tx.send(outcome);
            });
            self.pending.push((request.trim().to_string(), rx));
            self.push(Entry {
                request: request.trim().to_string(),
                ok: true,
                summary: "Not a known request; asking the language model…".into(),
                details: vec![],
            });
            return;
        }
        let mut outcome = actions::perform(&parsed, &self.ctx);
        if let Some(rx) = outcome.follow_up.take() {
            self.pending.push((request.trim().to_string(), rx));
        }
        self.push(Entry::from_outcome(request.trim(), &outcome));
    }

    fn push(&mut self, entry: Entry) {
        self.view.entries.insert(0, entry);
        self.view.entries.truncate(MAX_ENTRIES);
    }

    /// Collects results that arrived since the last call; true if any did.
    pub fn poll(&mut self) -> bool {
        let mut arrived = Vec::new();
        self.pending.retain(|(request, rx)| match rx.try_recv() {
            Ok(outcome) => {
                arrived.push(Entry::from_outcome(request, &outcome));
                false
            }
            Err(TryRecvError::Empty) => true,
            Err(TryRecvError::Disconnected) => false,
        });
        let changed = !arrived.is_empty();
        for e in arrived {
            self.push(e);
        }
        changed
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn shell() -> (Shell, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("notes.txt"), b"").expect("write");
        let ctx = ActionContext {
            home: dir.path().to_path_buf(),
            terminal: vec!["true".into()],
            wine: PathBuf::from("/nonexistent/wine"),
            wine_prefix: None,
            windows_app_dirs: vec![],
        };
        (Shell::new(ctx), dir)
    }

    #[test]
    fn typing_and_submitting_records_results_newest_first() {
        let (mut s, _dir) = shell();
        s.type_text("list my fil\u{7}es");
        s.backspace();
        s.type_text("s");
        assert_eq!(s.view.input, "list my files");
        s.submit();
        assert_eq!(s.view.input, "");
        s.type_text("how much memory is free");
        s.submit();
        assert_eq!(s.view.entries.len(), 2);
        assert_eq!(s.view.entries[0].request, "how much memory is free");
        assert_eq!(s.view.entries[1].details, vec!["notes.txt"]);
        s.type_text("   ");
        s.submit();
        assert_eq!(s.view.entries.len(), 2, "empty requests are not recorded");
        s.type_text("frobnicate the widget");
        s.submit();
        assert!(!s.view.entries[0].ok);
    }

    #[test]
    fn input_and_history_are_bounded() {
        let (mut s, _dir) = shell();
        s.type_text(&"a".repeat(10_000));
        assert_eq!(s.view.input.len(), MAX_INPUT);
        for _ in 0..(MAX_ENTRIES + 10) {
            s.type_text("uptime");
            s.submit();
        }
        assert_eq!(s.view.entries.len(), MAX_ENTRIES);
    }
}
