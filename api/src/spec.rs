//! The VM spec of `POST /v1/vms`: a name, the machine (the VMM's own
//! `kiln_vmm::VmConfig`, nested under `machine`), and what belongs to the
//! daemon: the restart policy, `autostart` and labels.
//!
//! The machine is nested rather than flattened because serde cannot refuse
//! unknown fields through `flatten`. Two of VmConfig's fields are the
//! daemon's, so a spec refuses them: `serial` (the daemon gives each VMM a
//! size-capped console log in its run directory) and `on_reboot` (a reboot
//! ends the VMM's run and the restart policy decides).

use std::collections::BTreeSet;

use kiln_vmm::{HostLimits, VmConfig};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::engine::VmPolicy;
use crate::error::{ApiError, ErrorCode};
use crate::exec::AgentSpec;
use crate::models::{Labels, VmStatus};
use crate::policy::{label_problems, name_problem, RestartPolicy};

/// VmConfig fields a VM spec may not set (see the module doc).
pub const DAEMON_OWNED_MACHINE_FIELDS: [&str; 2] = ["serial", "on_reboot"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique; lowercase letters, digits and dashes, at most 63 characters.
    pub name: String,
    #[serde(with = "machine")]
    pub machine: VmConfig,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Start the VM when the daemon starts.
    #[serde(default)]
    pub autostart: bool,
    #[serde(default)]
    pub labels: Labels,
    /// Reach a guest agent: the daemon gives the VM a vsock device whose
    /// socket is in the VM's run directory (not with `machine.vsock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentSpec>,
    /// What the policy engine may do with this VM (also
    /// `GET|PUT /v1/vms/{id}/policy`, which works while it runs).
    #[serde(default, skip_serializing_if = "is_default_policy")]
    pub policy: VmPolicy,
}

fn is_default_policy(p: &VmPolicy) -> bool {
    *p == VmPolicy::default()
}

/// `GET /v1/vms/{id}` and the items of `GET /v1/vms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub spec: VmSpec,
    pub status: VmStatus,
}

/// `GET /v1/vms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmList {
    pub vms: Vec<VmInfo>,
}

/// (De)serializes the machine without the daemon-owned fields.
mod machine {
    use super::*;

    pub fn serialize<S: Serializer>(config: &VmConfig, s: S) -> Result<S::Ok, S::Error> {
        let mut value = serde_json::to_value(config).map_err(serde::ser::Error::custom)?;
        if let Some(map) = value.as_object_mut() {
            for field in DAEMON_OWNED_MACHINE_FIELDS {
                map.remove(field);
            }
        }
        value.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VmConfig, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        if let Some(map) = value.as_object() {
            for field in DAEMON_OWNED_MACHINE_FIELDS {
                if map.contains_key(field) {
                    return Err(serde::de::Error::custom(format!(
                        "machine.{field} is set by the daemon, not by a VM spec"
                    )));
                }
            }
        }
        let mut config: VmConfig =
            serde_json::from_value(value).map_err(serde::de::Error::custom)?;
        config.assign_device_ids();
        Ok(config)
    }
}

impl VmSpec {
    /// Checks everything a spec can get wrong on its own and against this
    /// host: the name, labels, and the machine (`VmConfig::validate`: files,
    /// CPUs, memory against the host's RAM, devices). Every problem found is
    /// a cause of one `invalid_request`.
    pub fn validate(&self, host: &HostLimits) -> Result<(), ApiError> {
        let mut causes = Vec::new();
        causes.extend(name_problem(&self.name));
        causes.extend(label_problems(&self.labels));
        causes.extend(relative_paths(&self.machine));
        causes.extend(self.policy.problems(self.machine.memory_mib));
        if let Some(agent) = &self.agent {
            causes.extend(agent.problem());
            if self.machine.vsock.is_some() {
                causes.push(
                    "machine.vsock and agent are both set: the agent section gives the VM its \
                     vsock device (its socket in the VM's run directory)"
                        .into(),
                );
            }
        }
        if let Err(e) = self.machine.validate(host) {
            causes.push(error_chain(&e));
        }
        if causes.is_empty() {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("the VM spec {:?} is not valid", self.name),
            )
            .with_causes(causes))
        }
    }

    /// The fields that differ between two specs of one VM, by top-level name
    /// (`machine` counts as one).
    pub fn changed_fields(&self, other: &VmSpec) -> BTreeSet<&'static str> {
        let mut changed = BTreeSet::new();
        if self.name != other.name {
            changed.insert("name");
        }
        if self.machine != other.machine {
            changed.insert("machine");
        }
        if self.restart != other.restart {
            changed.insert("restart");
        }
        if self.autostart != other.autostart {
            changed.insert("autostart");
        }
        if self.labels != other.labels {
            changed.insert("labels");
        }
        if self.agent != other.agent {
            changed.insert("agent");
        }
        if self.policy != other.policy {
            changed.insert("policy");
        }
        changed
    }
}

/// Fields of a spec that a running VM takes without a restart (the policy
/// engine reads `policy` every round).
pub const LIVE_FIELDS: [&str; 4] = ["restart", "autostart", "labels", "policy"];

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        // Device errors often repeat their source in their own message.
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Host paths in a spec must be absolute: the daemon and its VMMs do not
/// run in the client's directory, and a relative path would name a file
/// wherever they happen to run (a fuzzed spec once created one there).
fn relative_paths(machine: &kiln_vmm::VmConfig) -> Vec<String> {
    let mut paths: Vec<(&str, &std::path::Path)> = vec![("machine.kernel", &machine.kernel)];
    if let Some(initrd) = &machine.initrd {
        paths.push(("machine.initrd", initrd));
    }
    for disk in &machine.disks {
        paths.push(("machine.disks[].path", &disk.path));
    }
    if let Some(vsock) = &machine.vsock {
        paths.push(("machine.vsock.uds", &vsock.uds_path));
    }
    if let Some(path) = machine
        .console
        .as_ref()
        .and_then(|c| c.output_path.as_ref())
    {
        paths.push(("machine.console.file", path));
    }
    paths
        .into_iter()
        .filter(|(_, p)| !p.is_absolute())
        .map(|(field, p)| {
            format!(
                "{field} {:?} is not an absolute path",
                p.display().to_string()
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_file() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"not really a kernel, but a readable file").unwrap();
        f
    }

    fn spec_json(kernel: &std::path::Path, extra: &str) -> String {
        format!(
            r#"{{"name":"web-1","machine":{{"kernel":{:?},"cpus":2,"memory_mib":256{extra}}}}}"#,
            kernel.to_str().unwrap()
        )
    }

    const HOST: HostLimits = HostLimits {
        max_vcpus: None,
        memory_mib: Some(4096),
    };

    #[test]
    fn a_minimal_spec_gets_defaults_and_validates() {
        let k = kernel_file();
        let spec: VmSpec = serde_json::from_str(&spec_json(k.path(), "")).unwrap();
        assert_eq!(spec.restart, RestartPolicy::default());
        assert!(!spec.autostart);
        assert_eq!(spec.machine.cpus, 2);
        spec.validate(&HOST).unwrap();
        // Serialized without the daemon-owned fields, and read back equal.
        let text = serde_json::to_string(&spec).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        for field in DAEMON_OWNED_MACHINE_FIELDS {
            assert!(value["machine"].get(field).is_none(), "{text}");
        }
        assert_eq!(serde_json::from_str::<VmSpec>(&text).unwrap(), spec);
    }

    #[test]
    fn relative_host_paths_are_refused() {
        let k = kernel_file();
        let spec: VmSpec = serde_json::from_str(&spec_json(
            k.path(),
            r#","disks":[{"path":"data.img"}],"console":{"file":"out"}"#,
        ))
        .unwrap();
        let e = spec.validate(&HOST).unwrap_err();
        let causes = e.causes.join("\n");
        assert!(
            causes.contains("machine.disks[].path \"data.img\" is not an absolute path"),
            "{causes}"
        );
        assert!(causes.contains("machine.console.file"), "{causes}");
        let relative: VmSpec =
            serde_json::from_str(&spec_json(std::path::Path::new("bzImage"), "")).unwrap();
        assert!(relative.validate(&HOST).is_err());
    }

    #[test]
    fn unknown_and_daemon_owned_fields_are_refused() {
        let k = kernel_file();
        for extra in [
            r#","serial":"stdio""#,
            r#","on_reboot":"restart""#,
            r#","colour":"red""#,
        ] {
            let err = serde_json::from_str::<VmSpec>(&spec_json(k.path(), extra)).unwrap_err();
            assert!(err.is_data(), "{extra}: {err}");
        }
        let top = format!(
            r#"{{"name":"a","machine":{{"kernel":{:?}}},"extra":1}}"#,
            k.path().to_str().unwrap()
        );
        assert!(serde_json::from_str::<VmSpec>(&top).is_err());
    }

    #[test]
    fn an_agent_section_takes_a_port_and_excludes_machine_vsock() {
        let k = kernel_file();
        let with = |agent: &str, extra: &str| -> VmSpec {
            let mut v: serde_json::Value =
                serde_json::from_str(&spec_json(k.path(), extra)).unwrap();
            v["agent"] = serde_json::from_str(agent).unwrap();
            serde_json::from_value(v).unwrap()
        };
        let spec = with("{}", "");
        assert_eq!(spec.agent, Some(AgentSpec { port: 5252 }));
        spec.validate(&HOST).unwrap();
        assert_eq!(with(r#"{"port":1024}"#, "").agent.unwrap().port, 1024);
        let e = with(r#"{"port":0}"#, "").validate(&HOST).unwrap_err();
        assert!(e.causes[0].contains("agent.port 0"), "{e:?}");
        let e = with("{}", r#","vsock":{"cid":3,"uds":"/tmp/x.sock"}"#)
            .validate(&HOST)
            .unwrap_err();
        assert!(e.causes[0].contains("machine.vsock and agent"), "{e:?}");
        let mut v: serde_json::Value = serde_json::from_str(&spec_json(k.path(), "")).unwrap();
        v["agent"] = serde_json::json!({"port": 1, "path": "/x"});
        assert!(
            serde_json::from_value::<VmSpec>(v).is_err(),
            "unknown field"
        );
        let mut b = spec.clone();
        b.agent = None;
        assert!(spec.changed_fields(&b).contains("agent"));
    }

    #[test]
    fn bad_values_are_all_listed() {
        let k = kernel_file();
        let mut spec: VmSpec = serde_json::from_str(&spec_json(k.path(), "")).unwrap();
        spec.name = "Web_1".into();
        spec.machine.cpus = 0;
        let err = spec.validate(&HOST).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        assert_eq!(err.causes.len(), 2, "{err:?}");
        assert!(err.causes[1].contains("cpus"), "{err:?}");
    }

    #[test]
    fn more_memory_than_the_host_or_a_missing_kernel_is_refused() {
        let k = kernel_file();
        let mut spec: VmSpec = serde_json::from_str(&spec_json(k.path(), "")).unwrap();
        spec.machine.memory_mib = 8192;
        let err = spec.validate(&HOST).unwrap_err();
        assert!(err.causes[0].contains("more than this host"), "{err:?}");
        spec.machine.memory_mib = 256;
        spec.machine.kernel = "/nonexistent/vmlinuz".into();
        let err = spec.validate(&HOST).unwrap_err();
        assert!(err.causes[0].contains("/nonexistent/vmlinuz"), "{err:?}");
    }

    #[test]
    fn changed_fields_tell_live_changes_from_machine_changes() {
        let k = kernel_file();
        let a: VmSpec = serde_json::from_str(&spec_json(k.path(), "")).unwrap();
        let mut b = a.clone();
        b.labels.insert("x".into(), "y".into());
        b.autostart = true;
        b.policy.memory_floor_mib = Some(64);
        assert_eq!(
            a.changed_fields(&b).into_iter().collect::<Vec<_>>(),
            ["autostart", "labels", "policy"]
        );
        assert!(a.changed_fields(&b).iter().all(|f| LIVE_FIELDS.contains(f)));
        b.machine.cpus = 3;
        assert!(a.changed_fields(&b).contains("machine"));
    }
}
