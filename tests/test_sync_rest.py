"""Against a real `mlflow server` over REST (sqlite backend, artifacts in tmp): the sync
service runs its loop with a long poll interval, and MLflow's own registry webhook
(HMAC-signed) makes it reconcile at once when the alias is set."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from registry_sync.config import load_sync_config
from registry_sync.service import SyncService
from tests.support.broker import MosquittoBroker, free_port
from tests.support.device_sim import SimDevice, write_world
from tests.support.registry import Registry

ROOT = "lineside/v1"


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    # Loopback http is refused by default (https only, no private IPs): allow it here.
    env = {
        **os.environ,
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            (tmp_path / "artifacts").as_uri(),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "server.log").open("wb"),
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_rest_registry_and_webhook_hint(
    mlflow_server: str, broker: MosquittoBroker, tmp_path: Path
) -> None:
    import mlflow

    name = "sync-rest-model"
    remote = Registry(tracking_uri=mlflow_server, root=tmp_path)
    from mlflow.tracking.fluent import _get_experiment_id

    old, old_exp = mlflow.get_tracking_uri(), _get_experiment_id()
    try:
        # The session's active experiment lives in the sqlite store, not on this server.
        mlflow.set_tracking_uri(mlflow_server)
        mlflow.set_experiment("rest-test")
        rng = np.random.default_rng(5)
        X = pd.DataFrame(rng.normal(size=(200, 3)), columns=["a", "b", "c"])
        remote.log_sklearn(
            LogisticRegression().fit(X, (X["a"] > 0).astype(int)),
            X,
            name="model",
            registered_name=name,
        )
    finally:
        mlflow.set_tracking_uri(old)
        mlflow.set_registry_uri(old)
        if old_exp is not None:
            mlflow.set_experiment(experiment_id=old_exp)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        hook_port = s.getsockname()[1]
    os.environ["SYNC_TEST_WEBHOOK_SECRET"] = "s3cret"
    path, keys = write_world(
        tmp_path / "sync",
        broker_url=broker.url,
        tracking_uri=mlflow_server,
        model=name,
        extra=(
            f'[webhook]\nlisten = "127.0.0.1:{hook_port}"\n'
            'secret_env = "SYNC_TEST_WEBHOOK_SECRET"\n'
        ),
    )
    text = path.read_text().replace("poll_interval_s = 0.5", "poll_interval_s = 600")
    path.write_text(text)
    service = SyncService(load_sync_config(path))
    remote.client().create_webhook(
        name="lineside-sync",
        url=f"http://127.0.0.1:{hook_port}/",
        events=["model_version_alias.created"],
        secret="s3cret",
    )
    stop = threading.Event()
    loop = threading.Thread(target=service.run, args=(stop,), daemon=True)
    dev = SimDevice(
        broker.url,
        "rest-dev",
        groups=("line-1",),
        device_class="sim-class",
        keys=keys,
        root=ROOT,
        workdir=tmp_path / "dev",
    )
    dev.start()
    try:
        loop.start()
        # The first pass runs at start (nothing to deploy); the next poll is 10 minutes
        # away, so only the webhook can make the device get the model in this test.
        deadline = time.monotonic() + 30
        while not (service.config.state_dir / "fleet.json").exists():
            assert time.monotonic() < deadline, "the first pass never ran"
            time.sleep(0.1)
        remote.set_alias(name, "production", 1)
        assert dev.wait_for(lambda d: d.version(name) == 1, timeout=60), dev.rejected
    finally:
        stop.set()
        service.wake.set()
        loop.join(15)
        dev.stop()
        os.environ.pop("SYNC_TEST_WEBHOOK_SECRET", None)
