//! Prometheus text for `GET /metrics`: API request counts and latencies by
//! route, per-VM state, and each running VM's counters from its VMM (vCPU
//! run and wait time, I/O worker rounds, virtio-net traffic, balloon).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use kiln_api::{VmInfo, VmState};
use kiln_vmm::protocol::Counters;

#[derive(Default)]
struct RouteStats {
    count: u64,
    seconds: f64,
}

/// Request counters, keyed by (method, route template, status).
#[derive(Default)]
pub struct RequestMetrics {
    by_key: Mutex<BTreeMap<(String, String, u16), RouteStats>>,
}

impl RequestMetrics {
    pub fn record(&self, method: &str, route: &str, status: u16, took: Duration) {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let stats = map
            .entry((method.to_owned(), route.to_owned(), status))
            .or_default();
        stats.count += 1;
        stats.seconds += took.as_secs_f64();
    }

    /// The whole exposition: requests, then VMs.
    pub fn render(&self, vms: &[VmInfo]) -> String {
        let mut out = String::new();
        let map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        out.push_str("# HELP kiln_api_requests_total API requests answered.\n");
        out.push_str("# TYPE kiln_api_requests_total counter\n");
        for ((method, route, status), s) in map.iter() {
            let _ = writeln!(
                out,
                "kiln_api_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {}",
                escape(route),
                s.count
            );
        }
        out.push_str(
            "# HELP kiln_api_request_duration_seconds_sum Time spent answering API requests.\n",
        );
        out.push_str("# TYPE kiln_api_request_duration_seconds_sum counter\n");
        for ((method, route, status), s) in map.iter() {
            let _ = writeln!(
                out,
                "kiln_api_request_duration_seconds_sum{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {}",
                escape(route),
                s.seconds
            );
        }
        drop(map);
        out.push_str("# HELP kiln_vm_state 1 for the state each VM is in.\n");
        out.push_str("# TYPE kiln_vm_state gauge\n");
        for vm in vms {
            for state in VmState::ALL {
                let _ = writeln!(
                    out,
                    "kiln_vm_state{{vm=\"{}\",state=\"{}\"}} {}",
                    escape(&vm.spec.name),
                    state.as_str(),
                    u8::from(vm.status.state == state)
                );
            }
        }
        out.push_str("# HELP kiln_vm_restarts Restarts kept in each VM's history.\n");
        out.push_str("# TYPE kiln_vm_restarts gauge\n");
        for vm in vms {
            let _ = writeln!(
                out,
                "kiln_vm_restarts{{vm=\"{}\"}} {}",
                escape(&vm.spec.name),
                vm.status.restarts.len()
            );
        }
        out
    }
}

/// One metric family: its HELP and TYPE lines, then one sample per
/// (labels, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// The counters of the running VMs: `answers` holds each running VM's
/// name and its VMM's answer (None when it did not answer in time; then
/// `kiln_vm_counters_up` is 0 and its other series are absent this scrape).
pub fn render_counters(out: &mut String, answers: &[(String, Option<Counters>)]) {
    let mut up = Vec::new();
    let (mut run, mut wait, mut rounds) = (Vec::new(), Vec::new(), Vec::new());
    let mut net: BTreeMap<&str, Vec<(String, f64)>> = BTreeMap::new();
    let (mut target, mut actual, mut inflated) = (Vec::new(), Vec::new(), Vec::new());
    let (mut guard_steps, mut guard_released) = (Vec::new(), Vec::new());
    for (name, counters) in answers {
        let vm = escape(name);
        up.push((
            format!("vm=\"{vm}\""),
            f64::from(u8::from(counters.is_some())),
        ));
        let Some(c) = counters else { continue };
        for v in &c.vcpus {
            let labels = format!("vm=\"{vm}\",vcpu=\"{}\"", v.index);
            run.push((labels.clone(), v.run_ns as f64 / 1e9));
            wait.push((labels, v.wait_ns as f64 / 1e9));
        }
        for d in &c.devices {
            let labels = format!("vm=\"{vm}\",device=\"{}\"", escape(&d.id));
            rounds.push((labels.clone(), d.busy_rounds as f64));
            if let Some(n) = &d.net {
                for (metric, value) in [
                    ("kiln_vm_net_tx_bytes_total", n.tx_bytes),
                    ("kiln_vm_net_tx_frames_total", n.tx_frames),
                    ("kiln_vm_net_tx_dropped_total", n.tx_dropped),
                    ("kiln_vm_net_rx_bytes_total", n.rx_bytes),
                    ("kiln_vm_net_rx_frames_total", n.rx_frames),
                    ("kiln_vm_net_rx_dropped_total", n.rx_dropped),
                ] {
                    net.entry(metric)
                        .or_default()
                        .push((labels.clone(), value as f64));
                }
            }
        }
        if let Some(b) = &c.balloon {
            let labels = format!("vm=\"{vm}\"");
            target.push((labels.clone(), b.target_mib as f64 * 1048576.0));
            actual.push((labels.clone(), b.actual_mib as f64 * 1048576.0));
            inflated.push((labels.clone(), b.inflated_mib as f64 * 1048576.0));
            guard_steps.push((labels.clone(), b.guard_deflations as f64));
            guard_released.push((labels, b.guard_released_mib as f64 * 1048576.0));
        }
    }
    family(
        out,
        "kiln_vm_counters_up",
        "gauge",
        "1 if the VM's VMM answered this scrape's counters request in time.",
        &up,
    );
    family(
        out,
        "kiln_vm_vcpu_run_seconds_total",
        "counter",
        "Time each vCPU thread ran on a host CPU.",
        &run,
    );
    family(
        out,
        "kiln_vm_vcpu_wait_seconds_total",
        "counter",
        "Time each vCPU thread was runnable but waited for a host CPU.",
        &wait,
    );
    family(
        out,
        "kiln_vm_device_busy_rounds_total",
        "counter",
        "Times each device's I/O worker found work.",
        &rounds,
    );
    for (metric, samples) in &net {
        family(
            out,
            metric,
            "counter",
            "virtio-net traffic of each net device.",
            samples,
        );
    }
    family(
        out,
        "kiln_vm_balloon_target_bytes",
        "gauge",
        "The balloon size asked of the guest.",
        &target,
    );
    family(
        out,
        "kiln_vm_balloon_actual_bytes",
        "gauge",
        "The balloon size the guest driver reports.",
        &actual,
    );
    family(
        out,
        "kiln_vm_balloon_inflated_bytes",
        "gauge",
        "Guest memory the balloon device has given back to the host.",
        &inflated,
    );
    family(
        out,
        "kiln_vm_balloon_guard_deflations_total",
        "counter",
        "Times the VMM deflated the balloon by itself on guest memory pressure.",
        &guard_steps,
    );
    family(
        out,
        "kiln_vm_balloon_guard_released_bytes_total",
        "counter",
        "Guest memory the VMM's pressure guard gave back to the guest.",
        &guard_released,
    );
}

/// Label values escape backslash, quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_per_route_and_status() {
        let m = RequestMetrics::default();
        m.record("GET", "/v1/ping", 200, Duration::from_millis(2));
        m.record("GET", "/v1/ping", 200, Duration::from_millis(3));
        m.record("GET", "/v1/vms/{id}", 404, Duration::from_millis(1));
        let text = m.render(&[]);
        assert!(
            text.contains(
                "kiln_api_requests_total{method=\"GET\",route=\"/v1/ping\",status=\"200\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("route=\"/v1/vms/{id}\",status=\"404\"} 1\n"),
            "{text}"
        );
        assert_eq!(escape("a\"b\\"), "a\\\"b\\\\");
    }
    #[test]
    fn running_vms_counters_become_series_and_a_silent_vmm_is_down() {
        let counters: Counters = serde_json::from_value(serde_json::json!({
            "vcpus": [{"index": 0, "tid": 7, "run_ns": 1_500_000_000u64, "wait_ns": 250_000_000u64}],
            "devices": [{"id": "net0", "busy_rounds": 9, "net": {"tx_frames": 3, "tx_bytes": 300,
                "tx_dropped": 0, "rx_frames": 4, "rx_bytes": 400, "rx_dropped": 1, "bad_chains": 0}}],
            "balloon": {"target_mib": 64, "actual_mib": 32, "inflated_mib": 32,
                "guard_deflations": 2, "guard_released_mib": 16},
        }))
        .unwrap();
        let mut text = String::new();
        render_counters(
            &mut text,
            &[("a".into(), Some(counters)), ("b".into(), None)],
        );
        for line in [
            "kiln_vm_counters_up{vm=\"a\"} 1\n",
            "kiln_vm_counters_up{vm=\"b\"} 0\n",
            "kiln_vm_vcpu_run_seconds_total{vm=\"a\",vcpu=\"0\"} 1.5\n",
            "kiln_vm_vcpu_wait_seconds_total{vm=\"a\",vcpu=\"0\"} 0.25\n",
            "kiln_vm_device_busy_rounds_total{vm=\"a\",device=\"net0\"} 9\n",
            "kiln_vm_net_rx_bytes_total{vm=\"a\",device=\"net0\"} 400\n",
            "kiln_vm_net_rx_dropped_total{vm=\"a\",device=\"net0\"} 1\n",
            "kiln_vm_balloon_target_bytes{vm=\"a\"} 67108864\n",
            "kiln_vm_balloon_inflated_bytes{vm=\"a\"} 33554432\n",
            "kiln_vm_balloon_guard_deflations_total{vm=\"a\"} 2\n",
            "kiln_vm_balloon_guard_released_bytes_total{vm=\"a\"} 16777216\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        assert!(!text.contains("vm=\"b\",vcpu"), "{text}");
    }
}
