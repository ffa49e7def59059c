//! Parts of a VM spec that belong to the daemon, not the VMM: the name,
//! the restart policy and labels, with their validation.

use serde::{Deserialize, Serialize};

/// Longest VM name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;
/// At most this many labels, each key and value at most `MAX_LABEL_LEN` bytes.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_LEN: usize = 256;

/// What the daemon does when a run of the VM ends one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartAction {
    /// Start the VM again (with back-off).
    Restart,
    /// Leave it stopped.
    Stop,
}

/// Per-VM restart policy. The defaults are libvirt's: a power-off stops,
/// a reboot restarts, a crash stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    #[serde(default = "stop")]
    pub on_poweroff: RestartAction,
    #[serde(default = "restart")]
    pub on_reboot: RestartAction,
    #[serde(default = "stop")]
    pub on_crash: RestartAction,
}

fn stop() -> RestartAction {
    RestartAction::Stop
}

fn restart() -> RestartAction {
    RestartAction::Restart
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            on_poweroff: stop(),
            on_reboot: restart(),
            on_crash: stop(),
        }
    }
}

/// Why a VM name is not accepted, if it is not.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("the name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Some(format!(
            "the name is {} characters long; at most {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!(
            "the name {name:?} has {c:?}; only lowercase letters, digits and dashes are allowed"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Some(format!("the name {name:?} starts or ends with a dash"));
    }
    None
}

/// Problems with the labels, one line each.
pub fn label_problems(labels: &crate::models::Labels) -> Vec<String> {
    let mut problems = Vec::new();
    if labels.len() > MAX_LABELS {
        problems.push(format!("{} labels; at most {MAX_LABELS}", labels.len()));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN {
            problems.push(format!(
                "label {k:?}: keys must be 1 to {MAX_LABEL_LEN} bytes and values at most {MAX_LABEL_LEN}"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for good in ["a", "web-1", "0", &"x".repeat(63)] {
            assert_eq!(name_problem(good), None, "{good}");
        }
        for bad in [
            "",
            "Web",
            "a_b",
            "a.b",
            "-a",
            "a-",
            "é",
            &"x".repeat(64),
            "a b",
        ] {
            assert!(name_problem(bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn restart_policy_defaults_and_refuses_unknown_fields() {
        let p: RestartPolicy = serde_json::from_str(r#"{"on_crash":"restart"}"#).unwrap();
        assert_eq!(p.on_crash, RestartAction::Restart);
        assert_eq!(p.on_poweroff, RestartAction::Stop);
        assert_eq!(p.on_reboot, RestartAction::Restart);
        assert!(serde_json::from_str::<RestartPolicy>(r#"{"on_halt":"stop"}"#).is_err());
        assert!(serde_json::from_str::<RestartPolicy>(r#"{"on_crash":"maybe"}"#).is_err());
    }

    #[test]
    fn too_many_or_too_long_labels_are_refused() {
        let mut labels = crate::models::Labels::new();
        labels.insert("team".into(), "kiln".into());
        assert!(label_problems(&labels).is_empty());
        labels.insert(String::new(), "x".into());
        labels.insert("k".into(), "v".repeat(300));
        assert_eq!(label_problems(&labels).len(), 2);
    }
}
