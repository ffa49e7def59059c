#!/usr/bin/env bash
# Schemathesis (PyPI) against a running `kiln serve` on loopback TCP, from
# api/openapi.yaml: 0 server errors and 0 responses that break the schema,
# or this fails. The event stream is fuzzed in its one-shot mode
# (follow=false); VMs it starts cannot boot on an emulating /dev/kvm and
# must crash with an event, never give a 5xx. Examples are capped
# (KILN_FUZZ_EXAMPLES, default 25 per operation) to stay under 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

venv=.cache/schemathesis-venv
if [ ! -x "$venv/bin/schemathesis" ]; then
    echo "api-fuzz: installing schemathesis into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "schemathesis==4.32.5"
fi
cargo build --release --locked -p kiln -p kiln-vmm >&2

work="$(mktemp -d)"
daemon_pid=
cleanup() {
    if [ -n "$daemon_pid" ]; then
        # Stop what the daemon started, then the daemon.
        KILN_SOCKET="$work/kiln.sock" target/release/kiln vm list --json 2>/dev/null |
            python3 -c 'import json,sys; [print(v["spec"]["name"]) for v in json.load(sys.stdin)]' 2>/dev/null |
            while read -r vm; do
                KILN_SOCKET="$work/kiln.sock" target/release/kiln vm delete --force "$vm" >/dev/null 2>&1 || true
            done
        kill "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

token="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s\n' "$token" > "$work/token"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
target/release/kiln serve --socket "$work/kiln.sock" --state-dir "$work/state" \
    --run-dir "$work/run" --listen "127.0.0.1:$port" --token-file "$work/token" \
    --shutdown-timeout 1 \
    > "$work/serve.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do
    [ -S "$work/kiln.sock" ] && break
    sleep 0.05
done
[ -S "$work/kiln.sock" ] || { cat "$work/serve.log" >&2; exit 1; }

# One VM that exists, so {id} operations reach more than 404.
guest="$("$KILN_BIN" guest fetch | sed -n 's/^kernel (bzImage): //p')"
KILN_SOCKET="$work/kiln.sock" target/release/kiln vm create web-1 --kernel "$guest" --memory 256M >&2

# The event stream in one-shot mode only: follow=false is the one value.
# Shutdown and reboot wait for a guest that never answers the power
# button here: at most 1 s (and --shutdown-timeout 1) keeps them in budget.
"$venv/bin/python" - "$work/openapi.yaml" <<'PY'
import sys, yaml
doc = yaml.safe_load(open("api/openapi.yaml"))
for p in doc["paths"]["/v1/events"]["get"]["parameters"]:
    if p["name"] == "follow":
        p["required"] = True
        p["schema"] = {"type": "boolean", "enum": [False]}
doc["components"]["parameters"]["ShutdownTimeout"]["schema"]["maximum"] = 1
yaml.safe_dump(doc, open(sys.argv[1], "w"), sort_keys=False)
PY

# Every operation in all modes but the event stream; then the event
# stream with valid queries only (a negative case may drop follow=false,
# and a followed stream never ends).
checks=not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance
# Schemathesis runs in the scratch directory: it keeps a .schemathesis
# cache where it runs.
venv_abs="$(realpath "$venv")"
fuzz() {
    (cd "$work" && "$venv_abs/bin/schemathesis" --no-color run "$work/openapi.yaml" \
        --url "http://127.0.0.1:$port" \
        -H "Authorization: Bearer $token" \
        --checks "$checks" \
        --max-examples "${KILN_FUZZ_EXAMPLES:-25}" \
        --request-timeout 10 \
        --workers 1 \
        --suppress-health-check all \
        "$@")
}
status=0
fuzz --exclude-path /v1/events 2>&1 | tee "$work/schemathesis.log" || status=$?
fuzz --include-path /v1/events --mode positive 2>&1 | tee "$work/schemathesis-events.log" || status=$?
for log in "$work/schemathesis.log" "$work/schemathesis-events.log"; do
    echo "api-fuzz: $(grep -E '[0-9]+ generated' "$log" | tail -1 | sed 's/^ *//'); $(tail -1 "$log" | tr -d '=')" >&2
done
exit "$status"
