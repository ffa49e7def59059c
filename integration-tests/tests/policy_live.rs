//! The policy engine on live guests (issue 11 item 7, memory): `kiln serve`
//! in the nested host with four guests that report their memory on their
//! consoles. Two idle, one whose working set grows from ~100 MiB to ~70% of
//! its memory over about 90 s, one with a periodic file-cache job; every
//! guest first touches its memory. Then, in order:
//! - shadow: the balloon lever decides and records, and nothing moves (no
//!   balloon is inflated, no decision is applied);
//! - active: the VMM processes' resident memory falls by at least 25% of
//!   what the guests were given, while they idle;
//! - growth: the growing guest gets its memory back in time, and no guest
//!   has an OOM kill;
//! - the growing workload's run time against its run before the policy is
//!   printed as a figure (one run each), not asserted.

use std::time::Duration;

use kiln_integration_tests::{Checks, GuestKit, Outcome};

/// Guest memory, MiB, and the four guests (name, role).
const GUEST_MIB: u64 = 512;
const GUESTS: [&str; 4] = ["g-idle1", "g-idle2", "g-grow", "g-cache"];
/// The grower's balloon before it grows, MiB: with this much taken, its
/// working set (~70% of its memory) no longer fits without a deflation.
const GROW_BALLOON_MIB: u64 = 128;

/// The guests' script (busybox sh): its role comes from the kernel command
/// line. Every 3 s it prints one `VMSTAT` line; `GROW` typed on its console
/// makes the grower grow its working set (a tmpfs file) and print how long
/// that took.
const KIT: &str = r#"
role=$(sed -n 's/.*kiln.role=\([a-z]*\).*/\1/p' /proc/cmdline)
mkdir -p /ws; mount -t tmpfs -o size=90% tmpfs /ws
mi() { awk -v k="$1:" '$1==k {print int($2/1024)}' /proc/meminfo; }
report() { echo "VMSTAT role=$role oom=$(awk '$1=="oom_kill"{print $2}' /proc/vmstat) avail=$(mi MemAvailable) cached=$(mi Cached) total=$(mi MemTotal) ws=$(du -sm /ws | cut -f1)"; }
# Touch what the guest has (less a margin), then free it: the host has
# backed every page once, as a guest that ran a while would have.
dd if=/dev/zero of=/ws/touch bs=1M count=$(( $(mi MemAvailable) - 64 )) 2>/dev/null; rm -f /ws/touch
echo KIT_TOUCHED
( while :; do report; sleep 3; done ) &
grow() {
  total=$(mi MemTotal); goal=$(( total * 70 / 100 )); t0=$(cut -d. -f1 /proc/uptime)
  dd if=/dev/zero of=/ws/grow bs=1M count=100 2>/dev/null
  n=100; while [ $n -lt $goal ]; do
    dd if=/dev/zero of=/ws/grow bs=1M count=10 seek=$n conv=notrunc 2>/dev/null || { echo GROW_FAILED at $n; return 1; }
    n=$((n+10)); sleep 3
  done
  echo "GROW_DONE mib=$n s=$(( $(cut -d. -f1 /proc/uptime) - t0 ))"
  echo GROW_END
}
case $role in
  grow) while read -r line; do case $line in GROW*) grow; rm -f /ws/grow;; esac; done ;;
  cache) while :; do dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null; sleep 20; done ;;
  *) while :; do sleep 3600; done ;;
esac
"#;

const PRELUDE: &str = r#"
D=/tmp/kp; S=$D/kiln.sock
k() { "$KILN" "$@" --socket "$S"; }
api() { curl -s --unix-socket "$S" "$@"; }
GUESTS="g-idle1 g-idle2 g-grow g-cache"
pid_of() { k vm show "$1" --json | grep -o '"pid": *[0-9]*' | grep -o '[0-9]*$'; }
# The VMMs' pids are written once after boot (no VM restarts in this test).
rss_of() { awk '/^VmRSS/ {print int($2/1024)}' /proc/$(awk -v g=$1 '$1==g {print $2}' $D/pids)/status; }
rss_sum() { s=0; for g in $GUESTS; do s=$((s + $(rss_of $g))); done; echo $s; }
inflated() { api http://localhost/v1/vms/$1/counters | grep -o '"inflated_mib":[0-9]*' | grep -o '[0-9]*$'; }
last_vmstat() { k vm console $1 --log 2>/dev/null | grep '^VMSTAT' | tail -1; }
"#;

/// The daemon starts; four guests boot and touch their memory.
const BOOT: &str = r#"
mkdir -p $D; truncate -s 192M $D/cache.img
"$KILN" serve --socket "$S" --state-dir $D/state --run-dir $D/run >> $D/serve.log 2>&1 &
echo $! > $D/daemon.pid
i=0; while ! api http://localhost/v1/ping > /dev/null 2>&1; do i=$((i+1)); [ $i -gt 150 ] && { echo DAEMON_DID_NOT_START; cat $D/serve.log; exit 1; }; sleep 0.2; done
for g in $GUESTS; do
  role=${g#g-}; role=${role%[0-9]}
  disk=""; [ $role = cache ] && disk="--disk path=$D/cache.img"
  k vm create $g --kernel "$GUEST_BZIMAGE" --initrd "$KIT" --memory __MIB__M --cpus 1 \
    --cmdline "console=ttyS0 reboot=k panic=1 quiet kiln.role=$role" \
    --balloon deflate_on_oom=on,stats=1 $disk --start > /dev/null || echo "CREATE_FAILED=$g"
done
t0=$(date +%s)
for g in $GUESTS; do
  i=0; while ! k vm console $g --log 2>/dev/null | grep -q KIT_TOUCHED; do i=$((i+1)); [ $i -gt 600 ] && { echo "NOT_TOUCHED=$g"; break; }; sleep 1; done
done
echo BOOT_S=$(( $(date +%s) - t0 ))
for g in $GUESTS; do echo "$g $(pid_of $g)"; done > $D/pids
sleep 5
echo RSS_TOUCHED=$(rss_sum)
for g in $GUESTS; do echo "START_$g: $(last_vmstat $g)"; done
"#;

/// The growing workload once without the policy: the reference run time.
const BASELINE: &str = r#"
echo GROW | k vm console g-grow --until GROW_END --timeout 400 > grow.out 2>&1
grep -o 'GROW_DONE mib=[0-9]* s=[0-9]*' grow.out | tail -1 | sed 's/.*s=/BASELINE_GROW_S=/'
# Until the grower's statistics show its working set gone: the engine,
# which starts next, must not take the baseline's peak for its own.
end=$(( $(date +%s) + 60 ))
while ! last_vmstat g-grow | grep -Eq ' ws=0([^0-9]|$)'; do [ $(date +%s) -gt $end ] && { echo NOT_SETTLED; break; }; sleep 2; done
sleep 5
"#;

/// Shadow: decisions are recorded, no balloon moves, no actuator is called.
const SHADOW: &str = r#"
k policy set --balloon shadow --interval-ms 1000 --balloon-window-s 15 --balloon-min-interval-s 2 --model-warmup-s 3600 > /dev/null || echo SET_FAILED
rss0=$(rss_sum)
sleep 45
for g in $GUESTS; do echo "SHADOW_INFLATED_$g=$(inflated $g)"; done
echo "SHADOW_DECISIONS=$(for g in $GUESTS; do k policy decisions $g --lever balloon --limit 1000 --json; done | grep -c '"outcome": *"shadow"')"
echo "SHADOW_APPLIED=$(for g in $GUESTS; do k policy decisions $g --limit 1000 --json; done | grep -c '"outcome": *"applied"')"
echo "SHADOW_RSS_DELTA=$(( rss0 - $(rss_sum) ))"
k policy decisions g-idle1 --limit 3 | sed 's/^/SHADOW_LOG: /'
"#;

/// Active: the idle guests give memory back; the VMMs' resident memory falls.
const ACTIVE: &str = r#"
rss0=$(rss_sum); t0=$(date +%s)
k policy set --balloon active > /dev/null || echo SET_FAILED
want=$(( __TOTAL__ / 4 ))
# Until the idle guests gave back a quarter of the memory and the grower
# holds a balloon big enough that its growth needs memory back.
end=$(( $(date +%s) + 300 ))
while [ $(( rss0 - $(rss_sum) )) -lt $want ] || [ "$(inflated g-grow)" -lt __GROW_BALLOON__ ]; do [ $(date +%s) -gt $end ] && break; sleep 2; done
echo "ACTIVE_RSS_DROP=$(( rss0 - $(rss_sum) ))"
echo "ACTIVE_S=$(( $(date +%s) - t0 ))"
for g in $GUESTS; do echo "ACTIVE_INFLATED_$g=$(inflated $g) rss=$(rss_of $g)"; done
k policy decisions g-idle1 --limit 3 | sed 's/^/ACTIVE_LOG: /'
k policy status | sed 's/^/STATUS: /'
"#;

/// Growth under the active policy: the grower gets its memory back, no
/// guest has an OOM kill.
const GROW: &str = r#"
echo GROW | k vm console g-grow --until GROW_END --timeout 400 > grow.out 2>&1
grep -o 'GROW_DONE mib=[0-9]* s=[0-9]*' grow.out | tail -1 | sed 's/.*s=/POLICY_GROW_S=/'
grep -c GROW_FAILED grow.out | sed 's/^/GROW_FAILED=/'
sleep 4
for g in $GUESTS; do echo "END_$g: $(last_vmstat $g)"; done
echo "OOM_TOTAL=$(for g in $GUESTS; do last_vmstat $g | sed 's/.*oom=\([0-9]*\).*/\1/'; done | awk '{s+=$1} END {print s+0}')"
echo "GROW_INFLATED=$(inflated g-grow)"
k policy decisions g-grow --lever balloon --limit 5 | sed 's/^/GROW_LOG: /'
k policy set --all-off true > /dev/null
for g in $GUESTS; do k vm stop $g > /dev/null; done
kill $(cat $D/daemon.pid)
"#;

fn num(out: &Outcome, key: &str) -> i64 {
    out.value(key)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no number {key}\n{}", out.output))
}

#[test]
#[ignore = "not reliable yet: the balloon heuristic balloons only two of the four guests (which two varies), so the grower is sometimes never ballooned and the growth check fails; run it with `cargo nextest run -p kiln-integration-tests --test policy_live --run-ignored ignored-only`"]
fn balloon_policy_reclaims_idle_memory_and_gives_it_back_in_time() {
    let kit = GuestKit::new(KIT)
        .build("policy_live")
        .expect("the guest kit builds");
    let total = GUEST_MIB * GUESTS.len() as u64;
    let fill = |s: &str| {
        format!(
            "KIT={}\n{PRELUDE}\n{}",
            kit.display(),
            s.replace("__MIB__", &GUEST_MIB.to_string())
                .replace("__TOTAL__", &total.to_string())
                .replace("__GROW_BALLOON__", &GROW_BALLOON_MIB.to_string())
        )
    };
    let mut checks = Checks::new("policy_live")
        .check("boot", &fill(BOOT))
        .check("baseline", &fill(BASELINE))
        .check("shadow", &fill(SHADOW))
        .check("active", &fill(ACTIVE))
        .check("grow", &fill(GROW));
    checks.scenario.files.push(kit.clone());
    checks.scenario.binaries.push("/usr/bin/curl".into());
    checks.scenario.timeout = Duration::from_secs(2400);
    let mut results = checks.run().expect("the nested host runs the checks");
    results
        .verify("boot", |out| {
            assert!(out.value("CREATE_FAILED").is_none(), "{}", out.output);
            assert!(out.value("NOT_TOUCHED").is_none(), "{}", out.output);
            eprintln!(
                "policy_live: guests booted and touched their memory in {} s; VMM RSS {} MiB",
                num(out, "BOOT_S"),
                num(out, "RSS_TOUCHED")
            );
        })
        .verify("baseline", |out| {
            num(out, "BASELINE_GROW_S");
        })
        .verify("shadow", |out| {
            for g in GUESTS {
                assert_eq!(
                    num(out, &format!("SHADOW_INFLATED_{g}")),
                    0,
                    "{g}: shadow mode inflated a balloon\n{}",
                    out.output
                );
            }
            assert!(
                num(out, "SHADOW_DECISIONS") > 0,
                "no shadow decision was recorded\n{}",
                out.output
            );
            assert_eq!(num(out, "SHADOW_APPLIED"), 0, "{}", out.output);
            eprintln!(
                "policy_live: shadow: {} decisions, RSS moved by {} MiB",
                num(out, "SHADOW_DECISIONS"),
                num(out, "SHADOW_RSS_DELTA")
            );
        })
        .verify("active", |out| {
            let drop = num(out, "ACTIVE_RSS_DROP");
            assert!(
                drop as u64 >= total / 4,
                "the VMMs' RSS fell by {drop} MiB, want >= {} (25% of {total})\n{}",
                total / 4,
                out.output
            );
            let grow = out
                .value("ACTIVE_INFLATED_g-grow")
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
            assert!(
                grow >= GROW_BALLOON_MIB,
                "the grower's balloon holds {grow} MiB before it grows, want >= {GROW_BALLOON_MIB} \
                 (else its growth would not need memory back)\n{}",
                out.output
            );
            eprintln!(
                "policy_live: active: RSS fell by {drop} MiB of {total} MiB allocated ({:.0}%) in {} s",
                100.0 * drop as f64 / total as f64,
                num(out, "ACTIVE_S")
            );
        })
        .verify("grow", |out| {
            assert_eq!(num(out, "OOM_TOTAL"), 0, "OOM kills\n{}", out.output);
            assert_eq!(num(out, "GROW_FAILED"), 0, "{}", out.output);
            num(out, "POLICY_GROW_S");
        });
    let base = results
        .get("baseline")
        .value("BASELINE_GROW_S")
        .and_then(|v| v.parse::<f64>().ok());
    let with = results
        .get("grow")
        .value("POLICY_GROW_S")
        .and_then(|v| v.parse::<f64>().ok());
    if let (Some(b), Some(w)) = (base, with) {
        eprintln!(
            "policy_live: growing workload {w:.0} s with the balloon policy vs {b:.0} s without \
             ({:.2}x; one run each, 1 s resolution, so the noise is at least ±{:.0}%; target within 10%)",
            w / b.max(1.0),
            100.0 / b.max(1.0)
        );
    }
    results.finish();
}
