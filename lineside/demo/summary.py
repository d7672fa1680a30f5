"""The demo's summary: what happened, as ``demo-summary.json`` and as printed lines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from lineside.demo import files
from lineside.demo.monitor import Monitor, percentile

__all__ = ["REFUSALS", "SUMMARY_FILE", "build", "echo_summary"]

SUMMARY_FILE = "demo-summary.json"
# Device events that mean "this version was not taken or was taken back".
REFUSALS = ("golden_mismatch", "load_failed", "schema_mismatch", "rolled_back", "known_bad")


def build(run: dict[str, Any], monitor: Monitor | None, started: float) -> dict[str, Any]:
    """``run`` (the steps and checks) with what the monitor saw: per model the versions
    served from when to when, answers and latency by version, refusals; anomaly rate per
    press; the outbox."""
    data = dict(run)
    if monitor is None:
        return data
    with monitor.lock:
        timeline = list(monitor.timeline)
        seen = {m: dict(v) for m, v in monitor.versions_seen.items()}
        events = list(monitor.events)
        rows = dict(monitor.rows_per_press)
        anomalies = dict(monitor.anomalies)
        telemetry = dict(monitor.telemetry)
        predictions = dict(monitor.predictions)
    end = round(time.monotonic() - started, 1)
    models: dict[str, Any] = {}
    for model in files.MODELS:
        changes = [(at, v) for at, m, v in timeline if m == model]
        served = [
            {
                "version": v,
                "from_s": round(at, 1),
                "to_s": round(changes[i + 1][0], 1) if i + 1 < len(changes) else end,
            }
            for i, (at, v) in enumerate(changes)
            if v is not None
        ]
        answered = {
            str(v): {
                "answered": s.answered,
                "first_s": round(s.first_at, 1),
                "last_s": round(s.last_at, 1),
                "latency_p50_ms": percentile(list(s.latencies_ms), 50),
                "latency_p99_ms": percentile(list(s.latencies_ms), 99),
            }
            for v, s in sorted(seen.get(model, {}).items())
        }
        refused = [
            {"version": e.get("version"), "code": e.get("code"), "at_s": round(at, 1)}
            for at, e in events
            if e.get("model") == model and e.get("code") in REFUSALS
        ]
        models[model] = {
            "served": served,
            "answered_by_version": answered,
            "refused": refused,
            "predictions": predictions.get(model, 0),
            "device_latency_ms": (telemetry.get("models") or {})
            .get(model, {})
            .get("latency_ms"),
        }
    data["models"] = models
    data["anomaly_rate_per_press"] = {
        press: {
            "rows": n,
            "anomalies": anomalies.get(press, 0),
            "rate": round(anomalies.get(press, 0) / n, 4) if n else None,
        }
        for press, n in sorted(rows.items())
    }
    data["outbox"] = telemetry.get("outbox")
    return data


def echo_summary(data: dict[str, Any], workdir: Path, error: str | None) -> None:
    """The summary lines (and the error once more on stderr when the run failed)."""
    ok = data["ok"]
    echo = click.echo
    echo("")
    echo(
        "lineside demo: "
        + ("every step happened" if ok else "FAILED")
        + f" in {data['elapsed_s']:.0f}s (budget {data['time_budget_s']:.0f}s)"
    )
    if not ok:
        echo(f"  error: {error}")
    for model, entry in (data.get("models") or {}).items():
        if not entry["served"] and not entry["refused"]:
            continue  # never deployed in this run
        echo(f"  {model}:")
        answered = entry["answered_by_version"]
        for span in entry["served"]:
            v = str(span["version"])
            stats = answered.get(v, {})
            latency = ""
            if stats.get("latency_p50_ms") is not None:
                latency = (
                    f", inference p50 {stats['latency_p50_ms']:.2f} ms "
                    f"p99 {stats['latency_p99_ms']:.2f} ms"
                )
            echo(
                f"    v{v}: served {span['from_s']:.1f}s-{span['to_s']:.1f}s, "
                f"answered {stats.get('answered', 0)} messages{latency}"
            )
        for refusal in entry["refused"]:
            v = str(refusal["version"])
            echo(
                f"    v{v}: {refusal['code']} at {refusal['at_s']:.1f}s, answered "
                f"{answered.get(v, {}).get('answered', 0)} messages"
            )
    presses = data.get("anomaly_rate_per_press") or {}
    if presses:
        echo(
            "  anomaly rate per press: "
            + ", ".join(
                f"{p} {e['anomalies'] / e['rows']:.1%} of {e['rows']}"
                for p, e in presses.items()
                if e["rows"]
            )
        )
    echo(f"  work dir: {workdir} (summary in {SUMMARY_FILE})")
    echo("  see the deployment history and device metrics in the MLflow UI:")
    echo(f"    {data['mlflow_ui']}")
    if not ok:
        click.echo(f"lineside demo: error: {error}", err=True)
