"""Trains kiln-policy's models from the engine's own feature files, exports
them to ONNX, and writes a schema file and a model card next to each.

Run through train.sh (one command rebuilds everything)."""
import argparse
import hashlib
import json
import os

import lightgbm as lgb
import numpy as np
import onnx
import onnxruntime as ort
from onnxmltools import convert_lightgbm
from onnxmltools.convert.common.data_types import FloatTensorType

SEED = 7

# name -> (label column, objective settings, output range, meaning)
MODELS = {
    "balloon": (
        "peak_ratio",
        dict(objective="quantile", alpha=0.98),
        (0.8, 4.0),
        "98th-percentile estimate of the working set's peak over the next 10 minutes, "
        "as a multiple of the current working set",
    ),
    "cpu": (
        "p90_next",
        dict(objective="quantile", alpha=0.75),
        (0.0, 1.0),
        "75th-percentile estimate of the 90th percentile of CPU use per vCPU over the next 10 minutes",
    ),
    "device": (
        "excess_us",
        dict(objective="regression"),
        (0.0, 5000.0),
        "expected mean I/O latency above the device's service time, in microseconds, "
        "for the candidate worker placement",
    ),
}


def load(path):
    with open(path) as f:
        header = f.readline().strip().split(",")
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32)
    return header, data


def train_one(name, data_dir, out_dir, traces):
    label, params, (lo, hi), meaning = MODELS[name]
    header, data = load(os.path.join(data_dir, f"{name}.csv"))
    feats = header[:-1]
    assert header[-1] == label, f"{name}.csv: last column {header[-1]}, want {label}"
    x, y = data[:, :-1], data[:, -1]
    # Hold out a deterministic 20% of rows for the model card's metrics.
    rng = np.random.default_rng(SEED)
    test = rng.random(len(y)) < 0.2
    model = lgb.LGBMRegressor(
        n_estimators=100,
        num_leaves=15,
        learning_rate=0.1,
        min_child_samples=50,
        deterministic=True,
        force_row_wise=True,
        n_jobs=1,
        random_state=SEED,
        verbose=-1,
        **params,
    )
    model.fit(x[~test], y[~test])
    pred = model.predict(x[test])
    metrics = {
        "rows_train": int((~test).sum()),
        "rows_test": int(test.sum()),
        "mae_test": float(np.mean(np.abs(pred - y[test]))),
        "label_mean_test": float(np.mean(y[test])),
    }
    if params["objective"] == "quantile":
        metrics["coverage_test"] = float(np.mean(y[test] <= pred))
        metrics["target_coverage"] = params["alpha"]

    onx = convert_lightgbm(
        model, initial_types=[("input", FloatTensorType([None, x.shape[1]]))], target_opset=15
    )
    # The converter names the graph with a random UUID; a fixed name keeps
    # rebuilt models byte-identical.
    onx.graph.name = f"kiln_{name}"
    path = os.path.join(out_dir, f"{name}.onnx")
    onnx.save_model(onx, path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out_name = sess.get_outputs()[0].name
    onnx_pred = sess.run(None, {"input": x[test][:2000]})[0].reshape(-1)
    metrics["onnx_vs_lightgbm_max_abs_diff"] = float(np.max(np.abs(onnx_pred - pred[:2000])))
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:12]

    schema = {
        "name": name,
        "version": f"1.{digest}",
        "lever": name,
        "input": "input",
        "features": [
            {"name": f, "min": float(np.min(x[:, i])), "max": float(np.max(x[:, i]))}
            for i, f in enumerate(feats)
        ],
        "output": out_name,
        "output_meaning": meaning,
        "output_min": lo,
        "output_max": hi,
    }
    with open(os.path.join(out_dir, f"{name}.schema.json"), "w") as f:
        json.dump(schema, f, indent=2)
        f.write("\n")

    card = [
        f"# Model card: {name}",
        "",
        f"- version: `{schema['version']}` (suffix = first 12 hex digits of the ONNX file's SHA-256)",
        f"- kind: LightGBM regressor, {params}, 100 trees of 15 leaves, exported with onnxmltools (opset 15)",
        f"- output `{out_name}`: {meaning}; the engine clamps it to [{lo}, {hi}]",
        f"- training data: simulator replay of synthetic traces ({traces}); the engine's own features "
        "(`kiln-policy dataset`), labels from the observations that followed",
        "- evaluation traces use split=eval parameter ranges and seeds 1001+, which training never sees",
        "",
        "## Inputs",
        "",
        "| feature | min in training | max in training |",
        "| --- | --- | --- |",
    ]
    card += [f"| {f['name']} | {f['min']:.4g} | {f['max']:.4g} |" for f in schema["features"]]
    card += ["", "## Metrics (20% held-out rows)", ""]
    card += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items()]
    card += ["", "Rebuild: `policy/training/train.sh`.", ""]
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(card))
    print(name, json.dumps(metrics))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--traces", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for name in MODELS:
        train_one(name, a.data, a.out, a.traces)


if __name__ == "__main__":
    main()
