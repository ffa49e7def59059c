#!/usr/bin/env bash
# Rebuilds policy/models/ from scratch: training traces (split=train, seeds
# 1-4, disjoint from the evaluation traces' split=eval and seeds 1001+), the
# engine's own features from the simulator, LightGBM models exported to ONNX
# with schema files and model cards. Deterministic: same pins, same models.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
ort="$("$here/setup.sh")"
export ORT_DYLIB_PATH="$ort"
venv="$repo/.cache/kiln-policy-venv"
work="$repo/.cache/kiln-policy-train"
rm -rf "$work"
mkdir -p "$work/data"
cargo build --release -q -p kiln-policy --manifest-path "$repo/Cargo.toml"
bin="$repo/target/release/kiln-policy"
host="$repo/policy/examples/host-64.toml"
for seed in 1 2 3 4; do
    "$bin" gen-trace --split train --seed "$seed" --vms 50 --hours 24 --out "$work/train-$seed.csv"
    "$bin" dataset --host "$host" --trace "$work/train-$seed.csv" --out-dir "$work/data" --seed "$seed" --every 3 --append
done
"$venv/bin/python" "$here/train.py" --data "$work/data" --out "$repo/policy/models" \
    --traces "split=train seeds=1,2,3,4 vms=50 hours=24 host=policy/examples/host-64.toml"
echo "models written to $repo/policy/models" >&2
