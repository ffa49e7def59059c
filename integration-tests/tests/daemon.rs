//! `kiln serve` end to end where guests boot: the daemon runs inside the
//! nested host (or on hardware KVM, directly), with three default guests
//! created through the REST API three ways: curl on the Unix socket, the
//! typed client (`kiln-api-probe`) and the `kiln vm create` CLI. One boot of
//! the nested host for every check; the checks run in order and share the
//! daemon (state in /tmp/kd).

use std::time::Duration;

use kiln_integration_tests::{Checks, Outcome};
use serde_json::Value;

/// Shell helpers every check starts with.
const PRELUDE: &str = r#"
D=/tmp/kd; S=$D/kiln.sock
CMD="console=ttyS0 reboot=k panic=1 quiet"
k() { "$KILN" "$@" --socket "$S"; }
api() { curl -s --unix-socket "$S" "$@"; }
start_daemon() {
  "$KILN" serve --socket "$S" --state-dir $D/state --run-dir $D/run --listen 127.0.0.1:8181 --token-file $D/token >> $D/serve.log 2>&1 &
  echo $! > $D/daemon.pid
  i=0; while ! api http://localhost/v1/ping > /dev/null 2>&1; do
    i=$((i+1)); [ $i -gt 150 ] && { echo DAEMON_DID_NOT_START; cat $D/serve.log; return 1; }; sleep 0.2
  done
}
console_count() { k vm console "$1" --log 2>/dev/null | grep -c "$2"; }
wait_console() { i=0; while [ "$(console_count $1 $2)" -lt $3 ]; do i=$((i+1)); [ $i -gt $4 ] && return 1; sleep 1; done; }
pid_of() { k vm show "$1" --json | grep -o '"pid": *[0-9]*' | grep -o '[0-9]*$'; }
state_of() { k vm show "$1" --json | grep -o '"state": *"[a-z]*"' | sed 's/.*"\([a-z]*\)"$/\1/'; }
last_seq() { k vm events --json | tail -1 | grep -o '"seq":[0-9]*' | grep -o '[0-9]*$'; }
"#;

/// The daemon starts; three guests are created three ways and boot.
const BOOT3: &str = r#"
mkdir -p $D; echo 0123456789abcdef0123 > $D/token
start_daemon || exit 1
spec() {
  echo '{"name":"'$1'","machine":{"kernel":"'$GUEST_BZIMAGE'","initrd":"'$GUEST_INITRD'","memory_mib":256,"cpus":1,"cmdline":"'"$CMD"'","balloon":{}},"labels":{"via":"'$2'"}}'
}
spec vm-a curl > a.json
spec vm-b client > b.json
t0=$(date +%s)
echo "CURL_CREATE=$(api -o a.out -w '%{http_code}' -X POST -H 'content-type: application/json' --data-binary @a.json 'http://localhost/v1/vms?start=true')"
sed 's/^/CURL_BODY: /' a.out; echo
"$PROBE" "$S" create b.json start > b.out; echo PROBE_EXIT=$?
sed 's/^/PROBE_BODY: /' b.out
k vm create vm-c --kernel "$GUEST_BZIMAGE" --initrd "$GUEST_INITRD" --memory 256M --cpus 1 --cmdline "$CMD" --balloon deflate_on_oom=on --restart on_crash=restart --label via=cli --start; echo CLI_CREATE_EXIT=$?
for v in vm-a vm-b vm-c; do wait_console $v KILN_SHELL_READY 1 400 && echo "BOOTED_$v=yes"; done
echo BOOT_S=$(( $(date +%s) - t0 ))
k vm list | sed 's/^/LIST: /'
for v in vm-a vm-b vm-c; do
  echo "SHOW_$v=$(k vm show $v --json | tr -d '\n')"
  echo "INIT_OK_$v=$(console_count $v KILN_INIT_OK)"
done
echo "PROBE_LIST=$("$PROBE" "$S" list | grep -o '"state":"running"' | wc -l)"
"#;

/// kill -9 of one VMM: crashed with an event, the others run on, and its
/// on_crash=restart boots it again.
const CRASH: &str = r#"
pa=$(pid_of vm-a); pb=$(pid_of vm-b); pc=$(pid_of vm-c)
echo "PIDS_BEFORE=$pa $pb $pc"
seq0=$(last_seq)
kill -9 $pc
i=0; while [ "$(k vm events --vm vm-c --since $seq0 --json | grep -c '"type":"restarted"')" = 0 ]; do i=$((i+1)); [ $i -gt 60 ] && break; sleep 1; done
k vm events --vm vm-c --since $seq0 --json | sed 's/^/EVENT: /'
wait_console vm-c KILN_SHELL_READY 2 400 && echo RESTART_BOOTED=yes
echo "PC_AFTER=$(pid_of vm-c)"
kill -0 $pa && kill -0 $pb && echo OTHERS_ALIVE=yes
for v in vm-a vm-b vm-c; do echo "STATE_$v=$(state_of $v)"; done
echo "OTHER_EVENTS=$(k vm events --since $seq0 --json | grep -cE '"vm":"vm-[ab]"')"
"#;

/// kill -9 of the daemon; a new one re-adopts every VMM; console, balloon
/// and counters work through it.
const READOPT: &str = r#"
pids="$(pid_of vm-a) $(pid_of vm-b) $(pid_of vm-c)"
echo "PIDS_BEFORE=$pids"
seq0=$(last_seq)
kill -9 $(cat $D/daemon.pid)
sleep 1
for p in $pids; do kill -0 $p 2>/dev/null || echo "VMM_DIED=$p"; done
start_daemon || exit 1
echo "PIDS_AFTER=$(pid_of vm-a) $(pid_of vm-b) $(pid_of vm-c)"
for v in vm-a vm-b vm-c; do echo "STATE_$v=$(state_of $v)"; done
echo "ADOPTED=$(k vm events --since $seq0 --json | grep -c '"type":"adopted"')"
echo 'echo KILN_$((40+2))' | timeout 150 "$KILN" vm console vm-b --until KILN_42 --timeout 120 --socket "$S" > con.out 2> con.err
echo CONSOLE_EXIT=$?
sed 's/^/CONSOLE_OUT: /' con.out; echo; sed 's/^/CONSOLE_ERR: /' con.err
echo "BALLOON_PUT=$(api -o bal.out -w '%{http_code}' -X PUT -H 'content-type: application/json' -d '{"target_mib":64}' http://localhost/v1/vms/vm-a/balloon)"
sed 's/^/BALLOON_BODY: /' bal.out; echo
i=0; while :; do
  c=$(api http://localhost/v1/vms/vm-a/counters)
  inf=$(echo "$c" | grep -o '"inflated_mib":[0-9]*' | grep -o '[0-9]*$')
  [ "${inf:-0}" -ge 64 ] && break
  i=$((i+1)); [ $i -gt 90 ] && break; sleep 1
done
echo "COUNTERS=$c"
"#;

/// Bad specs: a 4xx with a clear message each, and nothing left behind.
const BAD_SPECS: &str = r#"
post() { code=$(api -o bad.out -w '%{http_code}' -X POST -H 'content-type: application/json' --data-binary "$1" http://localhost/v1/vms); echo "$code $(cat bad.out)"; }
K=$GUEST_BZIMAGE
echo "BAD_missing_kernel=$(post '{"name":"bad","machine":{"kernel":"/nonexistent/vmlinuz"}}')"
echo "BAD_zero_cpus=$(post '{"name":"bad","machine":{"kernel":"'$K'","cpus":0}}')"
echo "BAD_huge_memory=$(post '{"name":"bad","machine":{"kernel":"'$K'","memory_mib":100000000}}')"
echo "BAD_duplicate=$(post '{"name":"vm-a","machine":{"kernel":"'$K'"}}')"
echo "BAD_unknown_field=$(post '{"name":"bad","machine":{"kernel":"'$K'"},"colour":"red"}')"
echo "BAD_malformed=$(post '{"name": "bad", ')"
head -c 1100000 /dev/zero | tr '\0' x > pad
{ printf '{"name":"bad","pad":"'; cat pad; printf '"}'; } > big.json
echo "BAD_huge_body=$(post @big.json)"
echo "VM_COUNT=$(k vm list | tail -n +2 | wc -l)"
echo "DEFINITIONS=$(ls $D/state/vms | tr '\n' ' ')"
echo "RUN_DIRS=$(ls $D/run/vms | tr '\n' ' ')"
"#;

/// TCP with and without the bearer token.
const TCP: &str = r#"
echo "TCP_NO_TOKEN=$(curl -s -o t.out -w '%{http_code}' http://127.0.0.1:8181/v1/vms) $(cat t.out)"
echo "TCP_TOKEN=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(cat $D/token)" http://127.0.0.1:8181/v1/vms)"
"#;

/// `shutdown` presses the power button: the guest powers off by itself.
const SHUTDOWN: &str = r#"
seq0=$(last_seq)
echo "SHUTDOWN=$(k vm shutdown vm-a --timeout 120 --json | tr -d ' \n')"
echo "STATE_AFTER=$(state_of vm-a)"
k vm events --vm vm-a --since $seq0 --json | sed 's/^/EVENT: /'
kill -0 $(pid_of vm-b) && echo OTHERS_RUN=yes
"#;

/// The models and ONNX Runtime the rig installs under /usr are found next to
/// /usr/bin/kiln, with no variable set, and every model loads (the same
/// search the daemon's policy engine makes).
const POLICY_MODELS: &str = r#"
env -u ORT_DYLIB_PATH -u KILN_MODELS_DIR "$KILN" policy models --check > pm.out 2>&1; echo POLICY_MODELS_EXIT=$?
sed 's/^/POLICY_MODELS: /' pm.out
"#;

/// Stops every VM and the daemon (so the nested host ends cleanly).
const CLEANUP: &str = r#"
for v in vm-b vm-c; do k vm stop $v > /dev/null; done
kill $(cat $D/daemon.pid)
"#;

fn value(out: &Outcome, key: &str) -> String {
    out.value(key).unwrap_or_default()
}

fn expect(out: &Outcome, key: &str, want: &str, why: &str) {
    assert_eq!(
        value(out, key),
        want,
        "{why} ({key})\n--- output ---\n{}\n--- log {}",
        out.output,
        out.log.display()
    );
}

const VMS: [(&str, &str); 3] = [("vm-a", "curl"), ("vm-b", "client"), ("vm-c", "cli")];

fn verify_boot(out: &Outcome) {
    expect(out, "CURL_CREATE", "201", "curl POST /v1/vms?start=true");
    expect(out, "PROBE_EXIT", "0", "the typed client's create");
    expect(out, "CLI_CREATE_EXIT", "0", "kiln vm create");
    for (vm, via) in VMS {
        expect(
            out,
            &format!("BOOTED_{vm}"),
            "yes",
            "the guest booted to its shell",
        );
        expect(
            out,
            &format!("INIT_OK_{vm}"),
            "1",
            "one KILN_INIT_OK in the log",
        );
        let shown: Value = serde_json::from_str(&value(out, &format!("SHOW_{vm}")))
            .unwrap_or_else(|e| panic!("show {vm}: {e}\n{}", out.output));
        assert_eq!(shown["status"]["state"], "running", "{vm}: {shown}");
        assert_eq!(shown["spec"]["machine"]["cpus"], 1, "{vm}: {shown}");
        assert_eq!(shown["spec"]["machine"]["memory_mib"], 256, "{vm}: {shown}");
        assert_eq!(shown["spec"]["labels"]["via"], via, "{vm}: {shown}");
        assert!(shown["status"]["pid"].as_u64().is_some(), "{vm}: {shown}");
        let row = out
            .output
            .lines()
            .find(|l| l.starts_with(&format!("LIST: {vm} ")))
            .unwrap_or_else(|| panic!("{vm} not in kiln vm list\n{}", out.output));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cells[1..6], [vm, "running", "1", "256", "MiB"], "{row}");
    }
    expect(
        out,
        "PROBE_LIST",
        "3",
        "the typed client lists three running VMs",
    );
    eprintln!("daemon: three guests booted in {} s", value(out, "BOOT_S"));
}

fn verify_crash(out: &Outcome) {
    let events: Vec<Value> = out
        .output
        .lines()
        .filter_map(|l| l.strip_prefix("EVENT: "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    for k in ["crashed", "policy_decision", "restarted"] {
        assert!(
            kinds.contains(&k),
            "no {k} event for vm-c: {kinds:?}\n{}",
            out.output
        );
    }
    let crash = events.iter().find(|e| e["type"] == "crashed").unwrap();
    assert!(
        crash["message"]
            .as_str()
            .unwrap_or_default()
            .contains("signal 9"),
        "{crash}"
    );
    expect(
        out,
        "RESTART_BOOTED",
        "yes",
        "on_crash=restart boots vm-c again",
    );
    let before: Vec<String> = value(out, "PIDS_BEFORE")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let after = value(out, "PC_AFTER");
    assert!(
        !after.is_empty() && after != before[2],
        "vm-c pid {after} vs {before:?}"
    );
    expect(out, "OTHERS_ALIVE", "yes", "the other VMMs keep running");
    for (vm, _) in VMS {
        expect(out, &format!("STATE_{vm}"), "running", "every VM runs");
    }
    expect(out, "OTHER_EVENTS", "0", "the crash touches no other VM");
}

fn verify_readopt(out: &Outcome) {
    assert!(
        !out.output.contains("VMM_DIED="),
        "a VMM died with the daemon\n{}",
        out.output
    );
    expect(
        out,
        "PIDS_AFTER",
        &value(out, "PIDS_BEFORE"),
        "the same VMMs after the restart",
    );
    for (vm, _) in VMS {
        expect(out, &format!("STATE_{vm}"), "running", "re-adopted running");
    }
    expect(out, "ADOPTED", "3", "one adopted event per VM");
    expect(out, "CONSOLE_EXIT", "0", "the attached console saw KILN_42");
    assert!(
        out.output.contains("CONSOLE_OUT: ") && out.output.contains("KILN_42"),
        "{}",
        out.output
    );
    expect(out, "BALLOON_PUT", "200", "PUT balloon on a re-adopted VM");
    let counters: Value = serde_json::from_str(&value(out, "COUNTERS"))
        .unwrap_or_else(|e| panic!("counters: {e}\n{}", out.output));
    assert_eq!(counters["balloon"]["target_mib"], 64, "{counters}");
    let inflated = counters["balloon"]["inflated_mib"].as_u64().unwrap_or(0);
    assert!(inflated > 0, "the guest gave nothing back: {counters}");
    let run_ns = counters["vcpus"][0]["run_ns"].as_u64().unwrap_or(0);
    assert!(run_ns > 0, "{counters}");
    eprintln!("daemon: balloon inflated to {inflated} of 64 MiB after re-adoption");
}

fn verify_bad_specs(out: &Outcome) {
    for (case, status, needle) in [
        ("missing_kernel", "422", "/nonexistent/vmlinuz"),
        ("zero_cpus", "422", "cpus"),
        ("huge_memory", "422", "more than this host"),
        ("duplicate", "409", "exists already"),
        ("unknown_field", "422", "colour"),
        ("malformed", "400", "not valid JSON"),
        ("huge_body", "413", "larger than"),
    ] {
        let line = value(out, &format!("BAD_{case}"));
        let (code, body) = line.split_once(' ').unwrap_or((&line, ""));
        assert_eq!(code, status, "{case}: {line}");
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{case}: {line}"));
        assert!(v["error"]["code"].is_string(), "{case}: {line}");
        assert!(body.contains(needle), "{case}: {line}");
    }
    expect(out, "VM_COUNT", "3", "no VM was added");
    expect(
        out,
        "DEFINITIONS",
        "vm-a.json vm-b.json vm-c.json",
        "no definition left behind",
    );
    expect(
        out,
        "RUN_DIRS",
        "vm-a vm-b vm-c",
        "no run directory left behind",
    );
}

fn verify_shutdown(out: &Outcome) {
    let result: Value = serde_json::from_str(&value(out, "SHUTDOWN"))
        .unwrap_or_else(|e| panic!("shutdown: {e}\n{}", out.output));
    assert_eq!(result["outcome"], "graceful", "{result}");
    assert_eq!(result["state"], "shutoff", "{result}");
    expect(out, "STATE_AFTER", "shutoff", "shut off after the shutdown");
    let shutoff_event = out
        .output
        .lines()
        .filter_map(|l| l.strip_prefix("EVENT: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|e| e["state"] == "shutoff");
    assert!(shutoff_event, "no shutoff event\n{}", out.output);
    expect(out, "OTHERS_RUN", "yes", "the other VMs run on");
}

fn verify_policy_models(out: &Outcome) {
    expect(out, "POLICY_MODELS_EXIT", "0", "kiln policy models --check");
    let lines: Vec<&str> = out
        .output
        .lines()
        .filter_map(|l| l.strip_prefix("POLICY_MODELS: "))
        .collect();
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(
        has("models: /usr/share/kiln/models (installed next to the running binary)"),
        "{}",
        out.output
    );
    assert!(
        has("onnx runtime: /usr/lib/kiln/libonnxruntime.so (installed next to the running binary)"),
        "{}",
        out.output
    );
    for name in ["balloon", "cpu", "device"] {
        let row = lines
            .iter()
            .find(|l| l.contains(&format!(" {name}@")))
            .unwrap_or_else(|| panic!("no {name} model listed\n{}", out.output));
        assert!(row.split_whitespace().nth(4) == Some("yes"), "{row}");
    }
}

fn verify_tcp(out: &Outcome) {
    let no_token = value(out, "TCP_NO_TOKEN");
    assert!(
        no_token.starts_with("401 ") && no_token.contains("unauthorized"),
        "{no_token}"
    );
    expect(out, "TCP_TOKEN", "200", "with the token");
}

#[test]
fn kiln_serve_runs_guests_through_crashes_and_its_own_restart() {
    let probe = env!("CARGO_BIN_EXE_kiln-api-probe");
    let with_prelude = |script: &str| format!("PROBE={probe}\n{PRELUDE}\n{script}");
    let mut checks = Checks::new("kiln_serve")
        .check("boot3", &with_prelude(BOOT3))
        .check("crash", &with_prelude(CRASH))
        .check("readopt", &with_prelude(READOPT))
        .check("bad_specs", &with_prelude(BAD_SPECS))
        .check("tcp", &with_prelude(TCP))
        .check("shutdown", &with_prelude(SHUTDOWN))
        .check("policy_models", POLICY_MODELS)
        .check("cleanup", &with_prelude(CLEANUP));
    checks.scenario.binaries.push(probe.into());
    checks.scenario.binaries.push("/usr/bin/curl".into());
    checks.scenario.timeout = Duration::from_secs(1500);
    let mut results = checks.run().unwrap();
    results
        .verify("boot3", verify_boot)
        .verify("crash", verify_crash)
        .verify("readopt", verify_readopt)
        .verify("bad_specs", verify_bad_specs)
        .verify("tcp", verify_tcp)
        .verify("shutdown", verify_shutdown)
        .verify("policy_models", verify_policy_models);
    eprintln!(
        "kiln serve checks: {:?} mode, nested host ready after {:?}, all checks {:?}",
        results.outcome.mode, results.outcome.host_ready, results.outcome.elapsed
    );
    results.finish();
}
