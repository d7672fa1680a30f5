"""How fast does a promotion reach the fleet, and how many bytes does the broker send?

For N in (10, 100, 500) simulated devices: a fresh loopback Mosquitto (started here), a
~1 MB model (RandomForest -> ONNX) in a sqlite MLflow registry, the sync service running
its loop in this process, and N devices that each own ONE MqttLink (one paho client,
one TCP connection) and run the agent's real acceptance and download code
(``check_manifest`` + ``ChunkAssembler``, tests/support/device_sim.py). Devices live in
a few worker subprocesses (one process with 1000 paho threads would measure the GIL).

Measured: the time from setting the alias (with a webhook-style wake-up of the loop) to
the last device holding the new version, and the broker's ``$SYS/broker/bytes/sent``
delta over that window divided by N x model size. The conversion is done (and cached)
before the clock starts; its duration is reported separately.

    python benchmarks/bench_sync_convergence.py [--sizes 10,100,500] [--workers 4]

Prints and writes JSON to benchmarks/results/bench_sync_convergence.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ROOT = "lineside/v1"
MODEL = "bench-press"


# ---- worker: N/P devices in one process -------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    from tests.support.device_sim import SimDevice

    keys = {k: bytes.fromhex(v) for k, v in json.loads(args.keys).items()}
    workdir = Path(args.workdir)
    devices = []
    for i in range(args.first, args.first + args.count):
        dev = SimDevice(
            args.url,
            f"dev-{i:04d}",
            groups=("line-1",),
            device_class="bench",
            keys=keys,
            root=ROOT,
            workdir=workdir / f"dev-{i:04d}",
            keep_bytes=False,
            loop_timeout=1.0,
        )
        dev.start(wait=30.0)
        devices.append(dev)
    # Every device is subscribed once its SUBACK-bearing connection is up; give the last
    # subscriptions a moment to be processed by the broker before declaring readiness.
    time.sleep(0.5)
    print(json.dumps({"ready": len(devices)}), flush=True)
    done: dict[str, float] = {}
    lock = threading.Lock()

    def watch(dev: SimDevice) -> None:
        if dev.wait_for(lambda d: d.version(MODEL) == args.version, timeout=args.timeout):
            with lock:
                done[dev.device.device_id] = time.time()

    threads = [threading.Thread(target=watch, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rejected = sum(len(d.rejected) for d in devices)
    stats: dict[str, int] = {}
    for d in devices:
        for k, v in d.link.stats.items():
            stats[k] = stats.get(k, 0) + v
    cpu = os.times()
    print(
        json.dumps(
            {
                "done": done,
                "rejected": rejected,
                "link_stats": stats,
                "cpu_s": round(cpu.user + cpu.system, 2),
                "codes": sorted({c for d in devices for c, _ in d.rejected}),
            }
        ),
        flush=True,
    )
    for dev in devices:
        dev.stop()


# ---- parent ---------------------------------------------------------------------------------


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    from tests.support.broker import free_port

    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                "set_tcp_nodelay true",
                "persistence false",
                "max_queued_messages 100000",
                "max_inflight_messages 100",
                "sys_interval 1",
                f"log_dest file {workdir / 'mosquitto.log'}",
                "log_type error",
            ]
        )
        + "\n"
    )
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    import socket

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


class SysBytes:
    """Follows ``$SYS/broker/bytes/sent`` (published every ``sys_interval`` second)."""

    def __init__(self, url: str) -> None:
        from edge_agent.mqtt import LinkOptions, MqttLink

        self.value: int | None = None
        self.updates = 0
        self.cond = threading.Condition()
        self.link = MqttLink(LinkOptions(url=url, client_id=f"bench-sys-{os.getpid()}"))
        self.link.subscribe("$SYS/broker/bytes/sent", self._on, qos=0)
        self.link.start(wait=10)

    def _on(self, msg: Any) -> None:
        with self.cond:
            self.value = int(msg.payload)
            self.updates += 1
            self.cond.notify_all()

    def fresh(self) -> int:
        """A value published after this call (waits for the next $SYS update, plus one)."""
        with self.cond:
            target = self.updates + 2
            while self.updates < target:
                self.cond.wait(5)
            assert self.value is not None
            return self.value

    def stop(self) -> None:
        self.link.stop(timeout=2)


def broker_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 1)


def make_model(tmp: Path) -> tuple[str, int]:
    import mlflow
    import numpy as np
    import pandas as pd
    from sklearn.ensemble import RandomForestClassifier

    from tests.support.registry import Registry

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.create_experiment("bench", artifact_location=(tmp / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    rng = np.random.default_rng(0)
    cols = [f"f{i}" for i in range(8)]
    X = pd.DataFrame(rng.normal(size=(4000, 8)), columns=cols)
    y = (X["f0"] + rng.normal(size=4000) > 0).astype(int)
    model = RandomForestClassifier(n_estimators=78, max_depth=10, random_state=0).fit(X, y)
    Registry(uri, tmp).log_sklearn(model, X, name="model", registered_name=MODEL)
    return uri, 1


def write_config(
    tmp: Path, url: str, tracking_uri: str, cache: Path
) -> tuple[Path, dict[str, str]]:
    from registry_sync import signing

    key_path = tmp / "release.pem"
    if not key_path.exists():
        signing.save_private_key(signing.generate_private_key(), key_path)
    key = signing.load_private_key(key_path)
    (tmp / "bench.toml").write_text(
        '[device]\nclass = "bench"\ngroups = ["line-1"]\n'
        f'topic_root = "{ROOT}"\n[runtime]\nvariants = ["onnx-fp32"]\n'
    )
    path = tmp / "sync.toml"
    path.write_text(f"""
[registry]
tracking_uri = "{tracking_uri}"
poll_interval_s = 30
[broker]
url = "{url}"
client_id = "bench-sync"
publish_timeout_s = 60
[signing]
key = "{key_path}"
[topics]
root = "{ROOT}"
[state]
dir = "{tmp / "state"}"
[build]
device_configs = ["bench.toml"]
cache_dir = "{cache}"
[[models]]
name = "{MODEL}"
[fleet]
history = false
""")
    return path, {signing.key_id(key): signing.public_key_bytes(key).hex()}


def run_size(
    n: int, workers: int, tmp: Path, tracking_uri: str, cache: Path, model_size: int
) -> dict[str, Any]:
    import mlflow

    from registry_sync.config import load_sync_config
    from registry_sync.service import SyncService

    run_dir = tmp / f"n{n}"
    broker, port = start_broker(run_dir / "broker")
    url = f"mqtt://127.0.0.1:{port}"
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else run_dir
    devdir = Path(tempfile.mkdtemp(prefix=f"lineside-bench-{n}-", dir=shm))
    procs: list[subprocess.Popen[str]] = []
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with contextlib.suppress(Exception):  # the alias is not set yet
        client.delete_registered_model_alias(MODEL, "production")
    config_path, keys = write_config(run_dir, url, tracking_uri, cache)
    service = SyncService(load_sync_config(config_path))
    stop = threading.Event()
    loop = threading.Thread(target=service.run, args=(stop,), daemon=True)
    sysbytes = SysBytes(url)
    try:
        per = -(-n // workers)
        for w in range(workers):
            first, count = w * per, min(per, n - w * per)
            if count <= 0:
                break
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        "--url",
                        url,
                        "--first",
                        str(first),
                        "--count",
                        str(count),
                        "--keys",
                        json.dumps(keys),
                        "--workdir",
                        str(devdir),
                        "--version",
                        "1",
                        "--timeout",
                        "120",
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=str(REPO),
                )
            )
        for p in procs:
            assert p.stdout is not None
            line = json.loads(p.stdout.readline())
            assert "ready" in line, line
        loop.start()
        deadline = time.monotonic() + 30
        while not (service.config.state_dir / "fleet.json").exists():  # first pass done
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = sysbytes.fresh()
        t0 = time.time()
        client.set_registered_model_alias(MODEL, "production", "1")
        service.wake.set()  # what the webhook hint does
        results = []
        for p in procs:
            assert p.stdout is not None
            results.append(json.loads(p.stdout.readline()))
        done = {d: t for r in results for d, t in r["done"].items()}
        after = sysbytes.fresh()
        converged = len(done) == n
        latest = max(done.values()) if done else float("nan")
        times = sorted(t - t0 for t in done.values())
        sent = after - before
        return {
            "devices": n,
            "converged": converged,
            "devices_converged": len(done),
            "seconds_to_all": round(latest - t0, 3),
            "seconds_p50": round(times[len(times) // 2], 3) if times else None,
            "seconds_first": round(times[0], 3) if times else None,
            "broker_bytes_sent": sent,
            "bytes_ratio": round(sent / (n * model_size), 4),
            "rejected": sum(r["rejected"] for r in results),
            "rejection_codes": sorted({c for r in results for c in r["codes"]}),
            "link_stats": {
                k: sum(r["link_stats"].get(k, 0) for r in results)
                for k in sorted({k for r in results for k in r["link_stats"]})
            },
            "worker_processes": len(procs),
            "worker_cpu_s": round(sum(r["cpu_s"] for r in results), 1),
            "broker_cpu_s": broker_cpu(broker.pid),
        }
    finally:
        stop.set()
        service.wake.set()
        loop.join(10)
        sysbytes.stop()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.terminate()
        broker.wait(10)
        subprocess.run(["rm", "-rf", str(devdir)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--url")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--keys")
    parser.add_argument("--workdir")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--sizes", default="10,100,500")
    parser.add_argument("--workers", type=int, default=10)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("registry_sync.service").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="lineside-bench-") as tmpdir:
        tmp = Path(tmpdir)
        tracking_uri, version = make_model(tmp)
        cache = tmp / "cache"
        from registry_sync.builder import Builder
        from registry_sync.config import load_sync_config

        config_path, _ = write_config(tmp, "mqtt://127.0.0.1:1", tracking_uri, cache)
        config = load_sync_config(config_path)
        t = time.perf_counter()
        bundle = Builder(cache, tracking_uri, config.build).bundle_for(
            MODEL, version, config.build.device_classes
        )
        convert_s = time.perf_counter() - t
        model_size = len(bundle.read_model())
        print(
            f"model: {model_size} bytes ({bundle.variant}), conversion {convert_s:.1f}s", flush=True
        )
        runs = []
        for n in [int(s) for s in args.sizes.split(",")]:
            workers = max(1, min(args.workers, n // 10 or 1))
            result = run_size(n, workers, tmp, tracking_uri, cache, model_size)
            print(json.dumps(result), flush=True)
            runs.append(result)
    out = {
        "benchmark": "sync_convergence",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "model_bytes": model_size,
        "variant": bundle.variant,
        "conversion_seconds_excluded": round(convert_s, 2),
        "targets": {"seconds_500": 30, "bytes_ratio": 1.1},
        "runs": runs,
    }
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "bench_sync_convergence.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
