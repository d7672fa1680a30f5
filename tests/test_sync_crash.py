"""The sync service killed with SIGKILL in the middle of a publish, for real (issue:
"a half-done publish interrupted by a crash ... the next pass converges; a device never
sees a manifest whose chunks are not all published").

`lineside sync once` runs as a subprocess; a watcher on the broker counts the chunks it
publishes and kills it after the k-th. After each kill every retained manifest must have
all its chunks retained, and a device listening throughout must have rejected nothing;
then an uninterrupted run converges and the device takes the version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import MosquittoBroker
from tests.support.device_sim import SimDevice, read_retained, shared_cache_dir, write_world
from tests.support.registry import Registry

ROOT = "lineside/v1"
MODEL = "sync-crash-forest"


def _log_forest(registry: Registry) -> None:
    """A model big enough (a forest, ~100 KB of ONNX) that a publish in 256-byte chunks
    lasts long enough to be killed in the middle."""
    import pandas as pd
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(7)
    features = [f"f{i}" for i in range(8)]
    X = pd.DataFrame(rng.normal(size=(600, 8)), columns=features)
    y = np.where(X.f0 + X.f1 * X.f2 > 0, "fault", "ok")
    forest = RandomForestClassifier(n_estimators=20, max_depth=8, random_state=0).fit(X, y)
    registry.log_sklearn(forest, X, name="forest", registered_name=MODEL)
    registry.set_alias(MODEL, "production", 1)


class _ChunkWatch:
    """Counts chunk publications as the broker delivers them."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.count = 0
        self.changed = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="chunk-watch")
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.subscribe(f"{ROOT}/chunks/#", 0)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        if msg.retain:  # already there when we subscribed: not part of this run
            return
        with self.changed:
            self.count += 1
            self.changed.notify_all()

    def wait_for(self, count: int, proc: subprocess.Popen[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.count < count:
                if proc.poll() is not None or time.monotonic() > deadline:
                    return False
                self.changed.wait(0.05)
        return True

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _sync_once(config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lineside.cli", "sync", "once", "--config", str(config)],
        cwd=config.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _manifests_complete(url: str) -> dict[str, int]:
    """Retained manifests -> their version, asserting each one's chunks are all retained."""
    manifests = read_retained(url, f"{ROOT}/manifests/#", client_id="crash-manifests")
    chunks = read_retained(url, f"{ROOT}/chunks/#", client_id="crash-chunks")
    have = {topic.rsplit("/", 1)[1] for topic in chunks}
    versions = {}
    for topic, payload in manifests.items():
        signed = json.loads(payload)["signed"]
        wanted = {c for f in signed["files"] for c in f["chunks"]}
        missing = wanted - have
        assert not missing, f"{topic} retained with {len(missing)} of its chunks missing"
        versions[topic] = int(signed["version"])
    return versions


def test_sync_killed_mid_publish_never_exposes_a_manifest_without_its_chunks(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry
) -> None:
    _log_forest(registry)
    config, keys = write_world(
        tmp_path / "sync",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=MODEL,
        cache_dir=shared_cache_dir(),
    )
    config.write_text(
        config.read_text().replace(
            'device_configs = ["sim-class.toml"]',
            'device_configs = ["sim-class.toml"]\nchunk_size = 256',
        )
    )
    env = dict(os.environ, MLFLOW_TRACKING_URI=registry.tracking_uri)
    device = SimDevice(
        broker.url,
        "pi-crash",
        groups=("line-1",),
        device_class="sim-class",
        keys=keys,
        root=ROOT,
        workdir=tmp_path / "dev",
    )
    device.start()
    watch = _ChunkWatch(broker.url)
    killed_before_manifest = 0
    try:
        for k in (1, 40):
            start = watch.count
            proc = _sync_once(config, env)
            # The first run also converts (minutes at worst on a loaded machine); the kill
            # waits for the k-th chunk of this run, not for a time.
            landed = watch.wait_for(start + k, proc, timeout=300)
            os.kill(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
            assert landed, f"sync once ended before its chunk {k}: {out[-2000:]}"
            if not _manifests_complete(broker.url):
                killed_before_manifest += 1
        # The invariant held after every kill; the kills must also have hit the window
        # they are meant to test (chunks partly out, no manifest yet).
        assert killed_before_manifest >= 1
        proc = _sync_once(config, env)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:]
        versions = _manifests_complete(broker.url)
        assert versions == {f"{ROOT}/manifests/line-1/{MODEL}": 1}
        assert device.wait_for(lambda d: d.version(MODEL) == 1), device.rejected
        assert device.rejected == []
    finally:
        watch.close()
        device.stop()
