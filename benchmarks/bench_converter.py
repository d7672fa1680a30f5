"""The converter end to end: size, parity and latency of every variant, per model family.

Each family is trained on synthetic data, logged with ``mlflow.sklearn.log_model`` into a
temporary sqlite MLflow store and converted with ``converter.pipeline.convert`` through all
six variants, with calibration rows (so onnx-int8 is static QDQ); onnx-int8 is converted a
second time without them (dynamic, reported as ``onnx-int8-dyn``). For every written
variant: file size as a ratio to the fp32 of the same format, the parity figures of the
ConversionResult, and the latency of ``edge_agent.runtime.load_session(...).run`` with one
intra-op thread, one row (median over single calls) and 256 rows (median over calls),
against ``mlflow.pyfunc.load_model(<original>).predict(DataFrame)`` measured in the same
run. BLAS/OpenMP pools are limited to one thread too (threadpoolctl), so every figure is
single-threaded, as on the device. IsolationForest is also timed through
skl2onnx's own graph, beside lineside's.

Prints a table and a summary of the issue's targets (met / not met, with the figure) and
writes benchmarks/results/bench_converter.json.

    python benchmarks/bench_converter.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bundle import MODEL_FILES
from converter.pipeline import ConversionResult, convert
from converter.variants import VARIANTS, runtime_of
from edge_agent.runtime import load_session

RESULTS = Path(__file__).resolve().parent / "results" / "bench_converter.json"
BATCH = 256
TRAIN_ROWS = 4000
CALIBRATION_ROWS = 512
EVAL_ROWS = 2048
SINGLE_ROWS_CYCLED = 64  # single-row calls cycle through this many different rows
DYNAMIC = "onnx-int8-dyn"

# The targets.
INT8_SIZE_TARGET = 0.30
INT8_TARGET_MIN_WEIGHTS = 10_000
SPEEDUP_TARGET = 50.0
ISOLATION_FOREST_TARGET_US = 100.0


@dataclass(frozen=True)
class Iterations:
    warmup: int
    single: int
    batch: int
    pyfunc_single: int
    pyfunc_batch: int


FULL = Iterations(warmup=200, single=2000, batch=100, pyfunc_single=2000, pyfunc_batch=100)
QUICK = Iterations(warmup=20, single=300, batch=20, pyfunc_single=100, pyfunc_batch=10)


# --- model families ------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    n_features: int
    task: str  # classifier | regressor | outlier | cluster
    build: Callable[[], Any]


def _families() -> list[Family]:
    from sklearn.cluster import KMeans
    from sklearn.ensemble import (
        GradientBoostingRegressor,
        IsolationForest,
        RandomForestClassifier,
    )
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import OneClassSVM

    def scaled(estimator: Any) -> Any:
        return make_pipeline(StandardScaler(), estimator)

    return [
        Family(
            "IsolationForest",
            8,
            "outlier",
            lambda: scaled(IsolationForest(n_estimators=100, random_state=0)),
        ),
        Family(
            "RandomForestClassifier",
            16,
            "classifier",
            lambda: RandomForestClassifier(n_estimators=100, max_depth=10, random_state=0),
        ),
        Family(
            "GradientBoostingRegressor",
            12,
            "regressor",
            lambda: GradientBoostingRegressor(random_state=0),
        ),
        Family(
            "LogisticRegression",
            32,
            "classifier",
            lambda: scaled(LogisticRegression(max_iter=1000)),
        ),
        # 8*96 + 96*96 + 96*3 = 10,272 weights: the smallest MLP the int8 target covers.
        Family(
            "MLPClassifier",
            8,
            "classifier",
            lambda: scaled(
                MLPClassifier(hidden_layer_sizes=(96, 96), max_iter=300, random_state=0)
            ),
        ),
        # 16*128 + 128*64 + 64 = 10,304 weights.
        Family(
            "MLPRegressor",
            16,
            "regressor",
            lambda: scaled(
                MLPRegressor(hidden_layer_sizes=(128, 64), max_iter=300, random_state=0)
            ),
        ),
        Family("OneClassSVM", 8, "outlier", lambda: scaled(OneClassSVM(nu=0.05, gamma="scale"))),
        Family("KMeans", 8, "cluster", lambda: KMeans(n_clusters=8, n_init=4, random_state=0)),
    ]


def _data(family: Family, n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Features with mixed scales (and 3 classes / a smooth target for supervised tasks)."""
    rng = np.random.default_rng(seed)
    f = family.n_features
    x = rng.normal(size=(n, f)) * np.linspace(0.5, 5.0, f) + np.linspace(-3.0, 3.0, f)
    if family.task == "cluster":
        centres = np.random.default_rng(99).normal(size=(8, f)) * 6.0
        x = centres[rng.integers(0, 8, size=n)] + rng.normal(size=(n, f))
    if family.task == "outlier":
        x[rng.random(n) < 0.03] *= 4.0
    # float32-representable, so the float32 variants and the float64 original see one input.
    x = x.astype(np.float32).astype(np.float64)
    frame = pd.DataFrame(x, columns=[f"f{i:02d}" for i in range(f)])
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    signal = z[:, 0] - 0.8 * z[:, 1] + 0.5 * np.sin(2 * z[:, 2]) + 0.3 * z[:, 3] * z[:, 4 % f]
    if family.task == "classifier":
        return frame, np.digitize(signal, np.quantile(signal, [1 / 3, 2 / 3]))
    if family.task == "regressor":
        return frame, 10.0 * signal + rng.normal(scale=0.3, size=n)
    return frame, None


def _n_weights(model: Any) -> int | None:
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    coefs = getattr(final, "coefs_", None)
    return int(sum(c.size for c in coefs)) if coefs is not None else None


def _log(model: Any, frame: pd.DataFrame, name: str) -> str:
    import mlflow
    import mlflow.sklearn
    import skops.io
    from mlflow.models import infer_signature

    signature = infer_signature(frame, model.predict(frame.iloc[:5]))
    trusted = sorted(set(skops.io.get_untrusted_types(data=skops.io.dumps(model))))
    with mlflow.start_run(run_name=name):
        info = mlflow.sklearn.log_model(
            model,
            name=name,
            signature=signature,
            input_example=frame.iloc[:5],
            skops_trusted_types=trusted,
        )
    return str(info.model_uri)


# --- timing --------------------------------------------------------------------------------


def _medians_us(fn: Callable[[int], Any], calls: int, warmup: int) -> tuple[float, float]:
    """Median wall time and median thread CPU time of single calls ``fn(i)``, in us.

    Both runtimes run in the calling thread with one intra-op thread, and BLAS pools are
    limited to one, so CPU time is the same work minus what other processes on the shared
    cores steal; wall time is the headline figure, CPU time the cross-check.
    """
    for i in range(warmup):
        fn(i)
    wall, cpu = [], []
    clock, thread_clock = time.perf_counter_ns, time.thread_time_ns
    for i in range(calls):
        c0 = thread_clock()
        t0 = clock()
        fn(i)
        t1 = clock()
        c1 = thread_clock()
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
    return statistics.median(wall) / 1e3, statistics.median(cpu) / 1e3


def _timed(
    single: Callable[[int], Any], batch: Callable[[int], Any], n: tuple[int, int], warm: int
) -> dict[str, float]:
    one_wall, one_cpu = _medians_us(single, n[0], warm)
    many_wall, many_cpu = _medians_us(batch, n[1], max(3, warm // 20))
    return {
        "single_row_us": one_wall,
        "batch256_us": many_wall,
        "single_row_cpu_us": one_cpu,
        "batch256_cpu_us": many_cpu,
    }


def _time_session(session: Any, x: np.ndarray, it: Iterations) -> dict[str, float]:
    ones = [np.ascontiguousarray(x[i : i + 1], dtype=np.float32) for i in range(SINGLE_ROWS_CYCLED)]
    batch = np.ascontiguousarray(x[:BATCH], dtype=np.float32)
    return _timed(
        lambda i: session.run(ones[i % len(ones)]),
        lambda _i: session.run(batch),
        (it.single, it.batch),
        it.warmup,
    )


def _time_pyfunc(model_uri: str, frame: pd.DataFrame, it: Iterations) -> dict[str, float]:
    import mlflow.pyfunc

    pyfunc = mlflow.pyfunc.load_model(model_uri)
    ones = [frame.iloc[i : i + 1] for i in range(SINGLE_ROWS_CYCLED)]
    batch = frame.iloc[:BATCH]
    return _timed(
        lambda i: pyfunc.predict(ones[i % len(ones)]),
        lambda _i: pyfunc.predict(batch),
        (it.pyfunc_single, it.pyfunc_batch),
        max(5, it.warmup // 10),
    )


def _time_skl2onnx_isolation_forest(
    model: Any, x: np.ndarray, tmp: Path, it: Iterations
) -> dict[str, Any]:
    """skl2onnx's own IsolationForest graph (what lineside replaces), same timing."""
    import onnx
    from skl2onnx import to_onnx

    onx = to_onnx(model, x[:1].astype(np.float32), target_opset={"": 21, "ai.onnx.ml": 3})
    path = tmp / "skl2onnx-isolation-forest.onnx"
    onnx.save_model(onx, path)
    session = load_session(path, "onnxruntime", threads=1)
    return {
        "nodes": len(onx.graph.node),
        "size": path.stat().st_size,
        **_time_session(session, x, it),
    }


# --- one family ----------------------------------------------------------------------------


def _variant_rows(result: ConversionResult, label: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for v in result.variants:
        parity = v.parity.as_dict() if v.parity else None
        rows.append(
            {
                "variant": label or v.variant,
                "status": v.status,
                "reason": v.reason,
                "size": v.size,
                "model_file": str(v.path / MODEL_FILES[runtime_of(v.variant)]) if v.path else None,
                "runtime": runtime_of(v.variant),
                "settings": v.settings,
                "parity": parity,
            }
        )
    return rows


def bench_family(family: Family, work: Path, it: Iterations) -> dict[str, Any]:
    print(f"[{family.name}] training, logging, converting ...", flush=True)
    load_before = os.getloadavg()
    train, y = _data(family, TRAIN_ROWS, seed=1)
    model = family.build().fit(train, y) if y is not None else family.build().fit(train)
    model_uri = _log(model, train, family.name)
    calibration = work / f"{family.name}-calibration.npy"
    np.save(calibration, train.to_numpy()[:CALIBRATION_ROWS])

    t0 = time.perf_counter()
    result = convert(model_uri, work / family.name, variants=VARIANTS, calibration_data=calibration)
    dynamic = convert(model_uri, work / f"{family.name}-dyn", variants=["onnx-int8"])
    convert_s = time.perf_counter() - t0
    variants = _variant_rows(result) + _variant_rows(dynamic, DYNAMIC)

    # Libraries loaded since the last call (scikit-learn's OpenMP, SciPy's BLAS) start with
    # a pool per core; limit them too before anything is timed.
    threadpool_limits(limits=1)
    fp32 = {
        v["runtime"]: v["size"] for v in variants if v["variant"].endswith("fp32") and v["size"]
    }
    evaluation, _ = _data(family, EVAL_ROWS, seed=2)
    x_eval = evaluation.to_numpy()
    for v in variants:
        if v["status"] != "written":
            continue
        base = fp32.get(v["runtime"])
        v["size_ratio_to_fp32"] = round(v["size"] / base, 4) if base else None
        session = load_session(Path(v["model_file"]), v["runtime"], threads=1)
        v["latency"] = _time_session(session, x_eval, it)
        print(
            f"  {v['variant']:14} {v['size']:>9} B  1 row {v['latency']['single_row_us']:9.1f} us"
            f"  256 rows {v['latency']['batch256_us']:10.1f} us",
            flush=True,
        )
    pyfunc = _time_pyfunc(model_uri, evaluation, it)
    print(
        f"  {'mlflow pyfunc':14} {'':>9}    1 row {pyfunc['single_row_us']:9.1f} us"
        f"  256 rows {pyfunc['batch256_us']:10.1f} us",
        flush=True,
    )
    for v in variants:
        if "latency" in v:
            lat = v["latency"]
            v["speedup_single_row"] = round(pyfunc["single_row_us"] / lat["single_row_us"], 2)
            v["speedup_batch256"] = round(pyfunc["batch256_us"] / lat["batch256_us"], 2)
            v["speedup_single_row_cpu"] = round(
                pyfunc["single_row_cpu_us"] / lat["single_row_cpu_us"], 2
            )
        v.pop("model_file")
    if (_n_weights(model) or 0) >= INT8_TARGET_MIN_WEIGHTS:
        _size_of_refused_int8(variants, model, family, train, fp32)
    out: dict[str, Any] = {
        "family": family.name,
        "task": family.task,
        "n_features": family.n_features,
        "estimator": repr(model),
        "n_weights": _n_weights(model),
        "convert_seconds": round(convert_s, 2),
        "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "pyfunc": pyfunc,
        "variants": variants,
    }
    if family.name == "IsolationForest":
        out["skl2onnx_graph"] = _time_skl2onnx_isolation_forest(model, x_eval, work, it)
    return out


def _size_of_refused_int8(
    variants: list[dict[str, Any]],
    model: Any,
    family: Family,
    train: pd.DataFrame,
    fp32: dict[str, int],
) -> None:
    """For int8 variants the parity gate refused: the size they would have had (info only).

    onnx-int8 reports its ratio in the settings; tflite-int8 is rebuilt as the pipeline
    builds it (same representative rows).
    """
    for v in variants:
        if v["status"] != "failed" or not v["variant"].endswith(("int8", "int8-dyn")):
            continue
        if v["runtime"] == "onnxruntime" and "size_ratio" in v["settings"]:
            v["size_ratio_to_fp32_if_shipped"] = v["settings"]["size_ratio"]
        elif v["variant"] == "tflite-int8" and fp32.get("tflite"):
            from converter import tflite_build

            rows = train.to_numpy()[:CALIBRATION_ROWS].astype(np.float32)
            data = tflite_build.sklearn_to_tflite(model, family.n_features, "tflite-int8", rows)
            v["size_ratio_to_fp32_if_shipped"] = round(len(data) / fp32["tflite"], 4)


# --- summary -------------------------------------------------------------------------------


def _written(family: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in family["variants"] if v["status"] == "written"]


def summarise(families: list[dict[str, Any]]) -> dict[str, Any]:
    targets: list[dict[str, Any]] = []
    # 1. int8 size on MLPs with >= 10k weights.
    for fam in families:
        if (fam["n_weights"] or 0) < INT8_TARGET_MIN_WEIGHTS:
            continue
        for name in ("onnx-int8", DYNAMIC, "tflite-int8"):
            v = next(v for v in fam["variants"] if v["variant"] == name)
            ratio = v.get("size_ratio_to_fp32")
            met = ratio is not None and ratio <= INT8_SIZE_TARGET
            figure = f"{ratio:.4f}x" if ratio is not None else f"{v['status']}: {v['reason']}"
            if v.get("size_ratio_to_fp32_if_shipped") is not None:
                figure += f" (its size would have been {v['size_ratio_to_fp32_if_shipped']:.3f}x)"
            targets.append(
                {
                    "target": f"{name} <= {INT8_SIZE_TARGET:.2f}x fp32 size, {fam['family']} "
                    f"({fam['n_weights']} weights)",
                    "met": met,
                    "figure": figure,
                }
            )
    # 2. single-row speed-up, geometric mean over families of each family's best variant.
    best = {}
    for fam in families:
        written = _written(fam)
        if written:
            top = max(written, key=lambda v: v["speedup_single_row"])
            best[fam["family"]] = {"variant": top["variant"], "speedup": top["speedup_single_row"]}
    geomean = _geomean(b["speedup"] for b in best.values())
    # Cross-checks (not targets): CPU-time speed-ups, and onnx-fp32 alone (no best-of pick).
    best_cpu = [
        max(v["speedup_single_row_cpu"] for v in _written(f)) for f in families if _written(f)
    ]
    fp32_only = [
        v["speedup_single_row"]
        for f in families
        for v in _written(f)
        if v["variant"] == "onnx-fp32"
    ]
    targets.append(
        {
            "target": f"single-row >= {SPEEDUP_TARGET:.0f}x faster than MLflow pyfunc "
            f"(geometric mean over {len(best)} families, best variant each)",
            "met": geomean >= SPEEDUP_TARGET,
            "figure": f"{geomean:.1f}x",
        }
    )
    # 3. IsolationForest single row.
    iso = next(f for f in families if f["family"] == "IsolationForest")
    onnx_fp32 = next(v for v in iso["variants"] if v["variant"] == "onnx-fp32")
    if "latency" in onnx_fp32:
        us = onnx_fp32["latency"]["single_row_us"]
        sk = iso["skl2onnx_graph"]["single_row_us"]
        targets.append(
            {
                "target": f"IsolationForest single row <= {ISOLATION_FOREST_TARGET_US:.0f} us "
                "(onnx-fp32)",
                "met": us <= ISOLATION_FOREST_TARGET_US,
                "figure": f"{us:.1f} us (skl2onnx's graph: {sk:.1f} us, {sk / us:.0f}x slower)",
            }
        )
    else:
        targets.append(
            {
                "target": "IsolationForest single row <= 100 us",
                "met": False,
                "figure": f"onnx-fp32 {onnx_fp32['status']}: {onnx_fp32['reason']}",
            }
        )
    return {
        "targets": targets,
        "best_variant_per_family": best,
        "geomean_speedup_single_row": geomean,
        "geomean_speedup_single_row_cpu_time": _geomean(best_cpu),
        "geomean_speedup_single_row_onnx_fp32": _geomean(fp32_only),
    }


def _geomean(values: Any) -> float:
    logs = [math.log(v) for v in values]
    return math.exp(statistics.fmean(logs)) if logs else float("nan")


def print_table(families: list[dict[str, Any]]) -> None:
    header = (
        f"{'family':26} {'variant':14} {'status':8} {'bytes':>9} {'x fp32':>7} {'agree':>7} "
        f"{'max|err|':>9} {'1 row us':>9} {'256 us':>9} {'x pyfunc 1':>10} {'x pyfunc 256':>12} "
        f"{'x pf 1 cpu':>10}"
    )
    print("\n" + header)
    print("-" * len(header))
    for fam in families:
        p = fam["pyfunc"]
        print(
            f"{fam['family']:26} {'mlflow pyfunc':14} {'':8} {'':>9} {'':>7} {'':>7} {'':>9} "
            f"{p['single_row_us']:>9.1f} {p['batch256_us']:>9.1f}   (1 row cpu "
            f"{p['single_row_cpu_us']:.1f} us)"
        )
        if "skl2onnx_graph" in fam:
            s = fam["skl2onnx_graph"]
            print(
                f"{'':26} {'skl2onnx graph':14} {'(ref)':8} {s['size']:>9} {'':>7} {'':>7} {'':>9} "
                f"{s['single_row_us']:>9.1f} {s['batch256_us']:>9.1f} "
                f"{p['single_row_us'] / s['single_row_us']:>10.1f} "
                f"{p['batch256_us'] / s['batch256_us']:>12.1f}"
            )
        for v in fam["variants"]:
            if v["status"] != "written":
                reason = (v["reason"] or "")[:90]
                if v.get("size_ratio_to_fp32_if_shipped") is not None:
                    reason = f"[{v['size_ratio_to_fp32_if_shipped']:.3f}x] " + reason
                print(f"{'':26} {v['variant']:14} {v['status']:8} {reason}")
                continue
            par = v["parity"] or {}
            agree = par.get("label_agreement_validation")
            errs = par.get("max_abs_error") or {}
            if par.get("regression_rel_error") is not None:
                err = f"{par['regression_rel_error']:.1e}r"
            else:
                err = f"{max(errs.values()):.1e}" if errs else "-"
            lat = v["latency"]
            print(
                f"{'':26} {v['variant']:14} {v['status']:8} {v['size']:>9} "
                f"{v['size_ratio_to_fp32']:>7.3f} "
                f"{(f'{agree:.4f}' if agree is not None else '-'):>7} {err:>9} "
                f"{lat['single_row_us']:>9.1f} {lat['batch256_us']:>9.1f} "
                f"{v['speedup_single_row']:>10.1f} {v['speedup_batch256']:>12.1f} "
                f"{v['speedup_single_row_cpu']:>10.1f}"
            )
    print(
        "\nagree = label agreement on the validation rows; max|err| = max abs error over score/"
        "probability/distance outputs, or (suffix r) regression error relative to the "
        "prediction spread; x pf 1 cpu = single-row speed-up in thread CPU time; "
        "[0.xxx] = size ratio of a variant the parity gate refused"
    )


def print_summary(summary: dict[str, Any]) -> None:
    print("\nTargets")
    for t in summary["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT MET':7}] {t['target']}: {t['figure']}")
    print(
        f"  cross-checks: geometric mean of the best variants' speed-up in thread CPU time "
        f"{summary['geomean_speedup_single_row_cpu_time']:.1f}x; onnx-fp32 alone (wall) "
        f"{summary['geomean_speedup_single_row_onnx_fp32']:.1f}x"
    )
    print("\nBest single-row variant per family (speed-up over MLflow pyfunc):")
    for name, b in summary["best_variant_per_family"].items():
        print(f"  {name:26} {b['variant']:14} {b['speedup']:8.1f}x")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "numpy",
        "pandas",
        "scikit-learn",
        "mlflow",
        "onnx",
        "onnxruntime",
        "skl2onnx",
        "onnxconverter-common",
        "tensorflow-cpu",
        "tensorflow",
        "ai-edge-litert",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def _machine() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "blas_openmp_pools": [
            {k: pool.get(k) for k in ("user_api", "internal_api", "num_threads")}
            for pool in threadpool_info()
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing iterations")
    parser.add_argument("--only", nargs="*", help="run only these families (debugging)")
    args = parser.parse_args()
    it = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with threadpool_limits(limits=1):
        run(args, it)


def run(args: argparse.Namespace, it: Iterations) -> None:

    import mlflow

    started = time.perf_counter()
    families_out = []
    with tempfile.TemporaryDirectory(prefix="lineside-bench-") as tmp:
        work = Path(tmp)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        experiment = mlflow.create_experiment(
            "bench", artifact_location=(work / "artifacts").as_uri()
        )
        mlflow.set_experiment(experiment_id=experiment)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        for family in _families():
            if args.only and family.name not in args.only:
                continue
            families_out.append(bench_family(family, work, it))
    summary = (
        summarise(families_out) if not args.only else {"targets": [], "best_variant_per_family": {}}
    )

    report = {
        "benchmark": "converter",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "iterations": it.__dict__,
        "setup": {
            "train_rows": TRAIN_ROWS,
            "calibration_rows": CALIBRATION_ROWS,
            "eval_rows": EVAL_ROWS,
            "batch": BATCH,
            "single_rows_cycled": SINGLE_ROWS_CYCLED,
            "runtime_threads": 1,
            "onnx_int8": "static QDQ calibrated on calibration_rows training rows; "
            f"{DYNAMIC} = the same conversion without calibration data (dynamic)",
            "latency": "median of individually timed calls, after warm-up; pyfunc = "
            "mlflow.pyfunc.load_model(original).predict(pandas DataFrame)",
        },
        "versions": _versions(),
        "machine": _machine(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "families": families_out,
    }
    print_table(families_out)
    if summary["targets"]:
        print_summary(summary)
    if args.only:
        print("\n--only: results not written")
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwritten {RESULTS} ({report['wall_seconds']} s)")


if __name__ == "__main__":
    main()
