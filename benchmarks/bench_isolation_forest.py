"""IsolationForest: lineside's graph vs skl2onnx's graph vs scikit-learn.

100 trees, 8 features. Latency of one row and of a 256-row batch (onnxruntime with one
intra-op thread, as on the device, through edge_agent.runtime.load_session), node counts,
file sizes, and the score's max abs error / label agreement vs sklearn on 5,000 rows. Ratios
against skl2onnx come from this same run. Prints a table and writes
benchmarks/results/bench_isolation_forest.json.

    python benchmarks/bench_isolation_forest.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import skl2onnx
import sklearn
from skl2onnx import to_onnx
from sklearn.ensemble import IsolationForest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.isolation_forest import isolation_forest_to_onnx
from edge_agent.runtime import load_session

N_TREES = 100
N_FEATURES = 8
BATCH = 256
N_EVAL = 5000
RESULTS = Path(__file__).resolve().parent / "results" / "bench_isolation_forest.json"


def data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES)) * np.linspace(0.5, 3.0, N_FEATURES)
    x[rng.random(n) < 0.05] *= 4.0
    return x.astype(np.float32)


def per_call_us(fn: Callable[[], Any], repeat: int, budget_s: float = 0.4) -> float:
    """Median over ``repeat`` rounds of the mean time per call, in microseconds."""
    fn()
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < budget_s / 4 or calls < 3:
        fn()
        calls += 1
    per_round = max(3, int(calls * 4 / repeat))
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(per_round):
            fn()
        rounds.append((time.perf_counter() - t0) / per_round * 1e6)
    return statistics.median(rounds)


def measure_onnx(
    name: str, onx: onnx.ModelProto, tmp: Path, x_eval: np.ndarray, ref: dict[str, Any], repeat: int
) -> dict[str, Any]:
    path = tmp / f"{name}.onnx"
    onnx.save_model(onx, path)
    session = load_session(path, threads=1)
    out = session.run(x_eval)
    label_name, score_name = ("label", "score") if "score" in out else ("label", "scores")
    score = out[score_name].ravel().astype(np.float64)
    label = out[label_name].ravel()
    one, batch = x_eval[:1], x_eval[:BATCH]
    return {
        "nodes": len(onx.graph.node),
        "file_bytes": path.stat().st_size,
        "single_row_us": per_call_us(lambda: session.run(one), repeat),
        "batch256_us": per_call_us(lambda: session.run(batch), repeat),
        "score_max_abs_error": float(np.abs(score - ref["score"]).max()),
        "label_agreement": float(np.mean(label == ref["label"])),
    }


def measure_sklearn(model: IsolationForest, x_eval: np.ndarray, repeat: int) -> dict[str, Any]:
    one, batch = x_eval[:1].astype(np.float64), x_eval[:BATCH].astype(np.float64)
    return {
        "single_row_us": per_call_us(lambda: model.decision_function(one), repeat),
        "batch256_us": per_call_us(lambda: model.decision_function(batch), repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    model = IsolationForest(n_estimators=N_TREES, random_state=0).fit(data(4000, seed=1))
    x_eval = data(N_EVAL, seed=2)
    ref = {
        "score": model.decision_function(x_eval.astype(np.float64)),
        "label": model.predict(x_eval.astype(np.float64)),
    }
    graphs = {
        "lineside": isolation_forest_to_onnx(model, N_FEATURES),
        "lineside-float32-thresholds": isolation_forest_to_onnx(
            model, N_FEATURES, thresholds="float32"
        ),
        # ai.onnx.ml 4 (skl2onnx's default) fails for IsolationForest (field notes, §2).
        "skl2onnx": to_onnx(model, x_eval[:1], target_opset={"": 21, "ai.onnx.ml": 3}),
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, onx in graphs.items():
            results[name] = measure_onnx(name, onx, Path(tmp), x_eval, ref, args.repeat)
    results["sklearn"] = measure_sklearn(model, x_eval, args.repeat)

    base = results["skl2onnx"]
    for name in ("lineside", "lineside-float32-thresholds", "sklearn"):
        for key in ("single_row_us", "batch256_us"):
            results[name][f"{key}_vs_skl2onnx"] = round(results[name][key] / base[key], 4)

    report = {
        "benchmark": "isolation_forest",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "setup": {
            "n_trees": N_TREES,
            "n_features": N_FEATURES,
            "batch": BATCH,
            "eval_rows": N_EVAL,
            "onnxruntime_threads": 1,
            "repeat": args.repeat,
        },
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    print(f"\nwritten {RESULTS}")


def print_table(results: dict[str, Any]) -> None:
    header = (
        f"{'graph':30} {'nodes':>6} {'bytes':>9} {'1 row us':>10} {'256 rows us':>12} "
        f"{'x skl2onnx (1/256)':>19} {'max|err|':>10} {'agree':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        ratio = (
            f"{r['single_row_us_vs_skl2onnx']:.3f}/{r['batch256_us_vs_skl2onnx']:.3f}"
            if "single_row_us_vs_skl2onnx" in r
            else "1/1"
        )
        print(
            f"{name:30} {r.get('nodes', '-')!s:>6} {r.get('file_bytes', '-')!s:>9} "
            f"{r['single_row_us']:>10.1f} {r['batch256_us']:>12.1f} {ratio:>19} "
            f"{r.get('score_max_abs_error', float('nan')):>10.2e} "
            f"{r.get('label_agreement', float('nan')):>7.4f}"
        )


if __name__ == "__main__":
    main()
