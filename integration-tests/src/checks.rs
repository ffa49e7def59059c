//! Several checks in one nested-host boot.
//!
//! Booting a nested host costs seconds of a core before any check runs, so
//! tests that need the same host share one boot: each check is a script of
//! its own, run in turn in its own work directory, with its own exit code
//! and output. A failing check does not stop the others; the test reports
//! every failed check at the end.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::scenario::{run, Outcome, RigError, Scenario};

const BEGIN: &str = "KILN_CHECK_BEGIN=";
const EXIT: &str = "KILN_CHECK_EXIT=";

/// Named scripts to run in one scenario.
pub struct Checks {
    /// The shared scenario: its name, timeout, binaries, files, disks and
    /// modules serve every check; its script is built from the checks.
    pub scenario: Scenario,
    checks: Vec<(String, String)>,
}

impl Checks {
    pub fn new(name: &str) -> Checks {
        Checks {
            scenario: Scenario::new(name, ""),
            checks: Vec::new(),
        }
    }

    /// Adds a check: `script` runs in `$WORKDIR/<name>` (which is also its
    /// `$WORKDIR`), like a scenario's script.
    pub fn check(mut self, name: &str, script: &str) -> Checks {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "check names are [A-Za-z0-9_]+: {name:?}"
        );
        assert!(
            self.checks.iter().all(|(n, _)| n != name),
            "duplicate check {name:?}"
        );
        self.checks.push((name.to_string(), script.to_string()));
        self
    }

    /// The scenario's script: each check written to a file and run in a
    /// subshell between markers.
    fn script(&self) -> String {
        let mut sh = String::from("_rig_top=\"$WORKDIR\"\n");
        for (name, script) in &self.checks {
            let delim = format!("KILN_CHECK_SCRIPT_END_{name}");
            assert!(
                !script.lines().any(|l| l == delim),
                "check {name} contains its own heredoc delimiter"
            );
            sh.push_str(&format!(
                "mkdir -p \"$_rig_top/{name}\"\ncat > \"$_rig_top/{name}.sh\" <<'{delim}'\n{script}\n{delim}\n\
                 echo {BEGIN}{name}\n\
                 (cd \"$_rig_top/{name}\" && WORKDIR=\"$_rig_top/{name}\" sh \"$_rig_top/{name}.sh\" < /dev/null 2>&1)\n\
                 echo \"{EXIT}{name}:$?\"\n"
            ));
        }
        sh
    }

    /// Runs every check in one boot. An error is the rig's (the host did
    /// not boot, stalled or timed out); a check's failure is in its result.
    pub fn run(mut self) -> Result<CheckResults, RigError> {
        self.scenario.script = self.script();
        let outcome = run(&self.scenario)?;
        let names: Vec<String> = self.checks.into_iter().map(|(n, _)| n).collect();
        let results = split(&outcome, &names);
        Ok(CheckResults {
            outcome,
            results,
            failures: Vec::new(),
        })
    }
}

/// Each check's part of the scenario's output, as an `Outcome` of its own
/// (exit code -1 when the check never finished).
fn split(outcome: &Outcome, names: &[String]) -> Vec<(String, Outcome)> {
    let mut parts: Vec<(String, Outcome)> = names
        .iter()
        .map(|n| {
            let o = Outcome {
                mode: outcome.mode,
                exit_code: -1,
                output: String::new(),
                log: outcome.log.clone(),
                elapsed: outcome.elapsed,
                host_ready: outcome.host_ready,
            };
            (n.clone(), o)
        })
        .collect();
    let mut current: Option<usize> = None;
    for line in outcome.output.lines() {
        if let Some(name) = line.strip_prefix(BEGIN) {
            current = parts.iter().position(|(n, _)| n == name);
            continue;
        }
        if let Some(rest) = line.strip_prefix(EXIT) {
            if let Some((name, code)) = rest.rsplit_once(':') {
                if let Some(i) = parts.iter().position(|(n, _)| n == name) {
                    parts[i].1.exit_code = code.trim().parse().unwrap_or(-1);
                }
            }
            current = None;
            continue;
        }
        if let Some(i) = current {
            parts[i].1.output.push_str(line);
            parts[i].1.output.push('\n');
        }
    }
    parts
}

/// The checks' results. Verify each with [`CheckResults::verify`], then
/// call [`CheckResults::finish`], which fails the test naming every check
/// whose assertions failed.
pub struct CheckResults {
    /// The whole scenario (its log, host boot time, all output).
    pub outcome: Outcome,
    results: Vec<(String, Outcome)>,
    failures: Vec<String>,
}

impl CheckResults {
    /// The check's own outcome. Panics on a name that was not a check.
    pub fn get(&self, name: &str) -> &Outcome {
        self.results
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, o)| o)
            .unwrap_or_else(|| panic!("no check named {name:?}"))
    }

    /// Runs `assertions` on the check's outcome; a panic in them is
    /// recorded as that check's failure and the next check still runs.
    pub fn verify(&mut self, name: &str, assertions: impl FnOnce(&Outcome)) -> &mut Self {
        let outcome = self.get(name);
        match catch_unwind(AssertUnwindSafe(|| assertions(outcome))) {
            Ok(()) => eprintln!("kiln-rig: check {name}: ok"),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "assertion failed".into());
                eprintln!("kiln-rig: check {name}: FAILED");
                self.failures.push(format!("check {name}: {msg}"));
            }
        }
        self
    }

    /// Fails the test if any verified check failed.
    pub fn finish(&mut self) {
        if !self.failures.is_empty() {
            panic!(
                "{} of {} checks failed (log {}):\n\n{}",
                self.failures.len(),
                self.results.len(),
                self.outcome.log.display(),
                self.failures.join("\n\n")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Mode;
    use std::path::PathBuf;
    use std::time::Duration;

    fn outcome(output: &str) -> Outcome {
        Outcome {
            mode: Mode::Nested,
            exit_code: 0,
            output: output.into(),
            log: PathBuf::from("log"),
            elapsed: Duration::ZERO,
            host_ready: None,
        }
    }

    #[test]
    fn output_is_split_per_check_with_exit_codes() {
        let out = outcome(
            "KILN_CHECK_BEGIN=a\nA=1\nKILN_CHECK_EXIT=a:0\nKILN_CHECK_BEGIN=b\nB=2\nmore\nKILN_CHECK_EXIT=b:3\n",
        );
        let names = ["a".to_string(), "b".to_string(), "c".to_string()];
        let parts = split(&out, &names);
        assert_eq!(parts[0].1.exit_code, 0);
        assert_eq!(parts[0].1.value("A").as_deref(), Some("1"));
        assert_eq!(parts[0].1.value("B"), None);
        assert_eq!(parts[1].1.exit_code, 3);
        assert_eq!(parts[1].1.output, "B=2\nmore\n");
        // Never started: the host died first.
        assert_eq!(parts[2].1.exit_code, -1);
        assert!(parts[2].1.output.is_empty());
    }

    #[test]
    fn failed_checks_are_collected_and_reported_together() {
        let parts = split(
            &outcome("KILN_CHECK_BEGIN=a\nKILN_CHECK_EXIT=a:1\nKILN_CHECK_BEGIN=b\nKILN_CHECK_EXIT=b:0\n"),
            &["a".into(), "b".into()],
        );
        let mut r = CheckResults {
            outcome: outcome(""),
            results: parts,
            failures: Vec::new(),
        };
        r.verify("a", |o| {
            o.expect_exit(0);
        })
        .verify("b", |o| {
            o.expect_exit(0);
        });
        assert_eq!(r.failures.len(), 1);
        assert!(r.failures[0].starts_with("check a:"), "{:?}", r.failures);
        let finished = catch_unwind(AssertUnwindSafe(|| r.finish()));
        assert!(finished.is_err(), "finish must fail the test");
    }

    #[test]
    fn the_script_runs_each_check_between_markers() {
        let c = Checks::new("t")
            .check("one", "echo hi")
            .check("two", "exit 4");
        let sh = c.script();
        assert!(sh.contains("echo KILN_CHECK_BEGIN=one"));
        assert!(sh.contains("echo \"KILN_CHECK_EXIT=two:$?\""));
        assert!(sh.contains("<<'KILN_CHECK_SCRIPT_END_one'\necho hi\nKILN_CHECK_SCRIPT_END_one\n"));
    }
}
