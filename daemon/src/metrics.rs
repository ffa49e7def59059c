//! Prometheus text for `GET /metrics`: API request counts and latencies by
//! route, and per-VM state.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use kiln_api::{VmInfo, VmState};

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
}
