"""Soak run (issue 6.11): the agent under a steady sensor stream with periodic updates.

    python benchmarks/soak.py          # the issue's run: 30 min, 500 msg/s, update every 5 min
    python benchmarks/soak.py --minutes 3 --update-every 60   # a shortened run

A real Mosquitto (from PATH), the agent as a subprocess (``lineside agent run``, so its RSS
is its own), a sensor client publishing at a fixed rate (QoS 1) and a consumer with a
persistent session. Every ``--update-every`` seconds a new signed version is published
(retained chunks + manifest; tests/support/faults.py builds real ONNX models). At the end
the stream stops, the backlog drains, and the script reports: messages sent, distinct
predictions received (by source id), lost ids, duplicates, versions seen, updates activated,
RSS at start (after warm-up) / max / end, and writes them as JSON (``--out``). Exit status
is non-zero if a prediction is lost or RSS grew by 10 MB or more.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    import subprocess

    import paho.mqtt.client as paho
    import psutil
    from paho.mqtt.enums import CallbackAPIVersion

    from tests.support.broker import running_broker
    from tests.support.faults import FEATURES, Gateway, release
    from tests.support.publisher import Collector, Publisher, wait_until

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--update-every", type=float, default=300.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--drain-timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/soak.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lineside-soak-"))
    # Persistence as in device_configs/mosquitto/plant-broker.conf (a save every 100
    # changes): saving on every change rewrites the broker's whole database per message,
    # which at 500 msg/s made the broker, not the agent, the bottleneck of the run.
    with running_broker(work / "broker", persistence=True, autosave_changes=100) as broker:
        gw = Gateway(work / "gw", port=broker.port, latency_budget_ms=200.0)
        gw.close()
        pub = Publisher(broker.port)
        version = 1
        rel = release(version)
        for cid, data in rel.chunks():
            pub.publish(pub.topics.chunk(cid), data)
        pub.manifest("line-1", "pump", rel.wire)
        col = Collector(broker.port, "lineside/devices/gw-1/#", client_id="soak-consumer")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lineside.cli",
                "agent",
                "run",
                "--config",
                str(work / "gw" / "agent.toml"),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        agent = psutil.Process(proc.pid)
        try:
            result = _soak(
                args,
                proc,
                agent,
                pub,
                col,
                broker,
                version,
                release,
                FEATURES,
                paho,
                CallbackAPIVersion,
                wait_until,
            )
        finally:
            proc.terminate()
            proc.wait(10)
            pub.close()
            col.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=1))
    ok = result["lost"] == 0 and result["rss_growth_mb"] < 10
    return 0 if ok else 1


def _soak(
    args: argparse.Namespace,
    proc: Any,
    agent: Any,
    pub: Any,
    col: Any,
    broker: Any,
    version: int,
    release: Any,
    FEATURES: list[str],
    paho: Any,
    CallbackAPIVersion: Any,
    wait_until: Any,
) -> dict[str, Any]:
    assert wait_until(lambda: len(col.events("activated")) >= 1, 60), "agent did not start"

    sensor = paho.Client(CallbackAPIVersion.VERSION2, client_id="soak-sensor")
    sensor.connect("127.0.0.1", broker.port)
    sensor.loop_start()
    sent = 0
    stop = threading.Event()

    def stream() -> None:
        nonlocal sent
        t0 = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - t0) * args.rate)
            while sent < due:
                body = dict.fromkeys(FEATURES, sent % 101 * 0.01)
                sensor.publish(
                    "plant/line1/a/sensors", json.dumps({**body, "id": f"m{sent}"}), qos=1
                )
                sent += 1
            time.sleep(0.005)

    feeder = threading.Thread(target=stream, daemon=True)
    feeder.start()
    start = time.monotonic()
    rss: list[tuple[float, float]] = []
    next_update = start + args.update_every
    rss_start = None
    while time.monotonic() - start < args.minutes * 60:
        time.sleep(1.0)
        now = time.monotonic() - start
        mb = agent.memory_info().rss / 2**20
        rss.append((round(now, 1), round(mb, 2)))
        if rss_start is None and now >= args.warmup:
            rss_start = mb
        if time.monotonic() >= next_update:
            version += 1
            rel = release(version)
            for cid, data in rel.chunks():
                pub.publish(pub.topics.chunk(cid), data)
            pub.manifest("line-1", "pump", rel.wire)
            next_update += args.update_every
    stop.set()
    feeder.join()
    duration = time.monotonic() - start
    backlog = [
        t.get("outbox", {}).get("depth", 0) for t in col.on("/telemetry") if isinstance(t, dict)
    ]
    drain_start = time.monotonic()

    def ids() -> set[str]:
        return {p["source"]["id"] for p in col.on("/predictions")}

    wait_until(lambda: len(ids()) >= sent, args.drain_timeout, interval=1.0)
    drain_s = time.monotonic() - drain_start
    preds = col.on("/predictions")
    got = ids()
    lost = sorted({f"m{i}" for i in range(sent)} - got, key=lambda s: int(s[1:]))
    rss_end = agent.memory_info().rss / 2**20
    result = {
        "minutes": round(duration / 60, 2),
        "rate_target": args.rate,
        "rate_achieved": round(sent / duration, 1),
        "sent": sent,
        "predictions_received": len(preds),
        "distinct_received": len(got),
        "lost": len(lost),
        "lost_sample": lost[:10],
        "duplicates": len(preds) - len(got),
        "versions_seen": sorted({p["version"] for p in preds}),
        "updates_published": version - 1,
        "outbox_depth_max": max(backlog, default=0),
        "outbox_depth_at_stream_end": backlog[-1] if backlog else 0,
        "drain_seconds_after_stream": round(drain_s, 1),
        "activated_events": len(col.events("activated")),
        "rolled_back_events": len(col.events("rolled_back")),
        "rss_mb_after_warmup": round(rss_start or rss[0][1], 2),
        "rss_mb_max": max(m for _, m in rss),
        "rss_mb_end": round(rss_end, 2),
        "rss_growth_mb": round(rss_end - (rss_start or rss[0][1]), 2),
        "rss_samples": rss[:: max(1, len(rss) // 30)],
    }
    sensor.loop_stop()
    return result


if __name__ == "__main__":
    sys.exit(main())
