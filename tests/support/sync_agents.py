"""Real edge agents driven by the real registry_sync service, for end-to-end fleet tests.

- ``log_classifier`` / ``log_overflowing_regressor`` log scikit-learn models with MLflow's
  own ``mlflow.sklearn.log_model`` and register them. ``pip_requirements`` is given so
  MLflow does not start a subprocess to infer them (that is most of a log call's time).
- ``write_agent_config`` writes a device config for ``edge_agent.config.load_config`` of
  the device class the sync world's ``sim-class.toml`` describes (tests/support/device_sim.py
  ``write_world``), so the manifests' ``targets.device_classes`` name it.
- ``EdgeAgent`` is ``edge_agent.agent.Agent`` started for real (MQTT link, updater thread,
  inference engine, outbox pump, telemetry thread) with helpers to read what it serves.
- ``Sensors`` publishes sensor messages on a device's input topic.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_agent.mqtt import LinkOptions, MqttLink

ROOT = "lineside/v1"  # device_sim.write_world's default topic root
DEVICE_CLASS = "sim-class"  # the class device_sim.write_world describes to the sync service
FEATURES = ("vibration", "temp", "current")


def _frame(seed: int, features: Sequence[str] = FEATURES) -> Any:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(200, len(features))), columns=list(features))


def _log(registry: Any, model: Any, X: Any, registered_name: str) -> int:
    """``mlflow.sklearn.log_model`` with a signature and an input example; the version."""
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    from tests.support.registry import _skops_trusted_types

    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.tracking_uri)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            registered_model_name=registered_name,
            signature=infer_signature(X, model.predict(X[:5])),
            input_example=X[:5],
            pip_requirements=["scikit-learn", "skops"],
            skops_trusted_types=_skops_trusted_types(model),
        )
    return int(info.registered_model_version)


def log_classifier(
    registry: Any, name: str, slope: float, *, extra_features: Sequence[str] = ()
) -> int:
    """A logistic regression on FEATURES (``vibration + slope * temp > 0``); with
    ``extra_features`` it also takes inputs the agents here do not map (a version every
    device refuses at its smoke test: ``schema_mismatch``)."""
    from sklearn.linear_model import LogisticRegression

    X = _frame(3, (*FEATURES, *extra_features))
    y = (X["vibration"] + slope * X["temp"] > 0).astype(int)
    return _log(registry, LogisticRegression().fit(X, y), X, name)


# Live readings that overflow OVERFLOW's float32 outputs: 1e36 * 3000 > 3.4e38.
OVERFLOW_INPUT = 1000.0


def log_overflowing_regressor(registry: Any, name: str) -> int:
    """A valid but bad version: a linear regression fitted to a target in the wrong unit
    (x 1e36). On its training-like rows (the converter's parity sample, the golden pairs,
    the agent's smoke test) the float32 outputs are finite (~1e36) and match the original;
    on live readings of a few hundred they overflow to infinity, which only the agent's
    health window sees."""
    from sklearn.linear_model import LinearRegression

    X = _frame(5)
    y = 1e36 * (X["vibration"] + X["temp"] + X["current"])
    return _log(registry, LinearRegression().fit(X, y), X, name)


def input_topic(device: str) -> str:
    return f"plant/{device}/sensors"


def write_agent_config(
    path: Path,
    *,
    device: str,
    url: str,
    state_dir: Path,
    keys: Mapping[str, bytes],
    groups: Sequence[str],
    models: Sequence[str],
    window_s: float = 1.0,
    telemetry_s: float = 0.5,
) -> Path:
    """One agent config: every model reads ``input_topic(device)`` with FEATURES mapped
    one to one."""
    lines = [
        "[device]",
        f'id = "{device}"',
        f'class = "{DEVICE_CLASS}"',
        f"groups = {json.dumps(list(groups))}",
        f'state_dir = "{state_dir}"',
        f'topic_root = "{ROOT}"',
        "[runtime]",
        'variants = ["onnx-fp32"]',
        "[broker]",
        f'url = "{url}"',
        "keepalive_s = 5",
        "[trusted_keys]",
        *[f'{kid} = "{raw.hex()}"' for kid, raw in keys.items()],
        "[limits]",
        "update_deadline_s = 60",
        "[health]",
        f"window_s = {window_s}",
        "max_error_rate = 0.5",
        "latency_budget_ms = 1000",
        "[telemetry]",
        f"interval_s = {telemetry_s}",
    ]
    for model in models:
        lines += [
            "[[models]]",
            f'name = "{model}"',
            f'input_topics = ["{input_topic(device)}"]',
            "[models.fields]",
            *[f'{f} = "{f}"' for f in FEATURES],
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class EdgeAgent:
    """The real agent of one device, started on the broker."""

    def __init__(self, root: Path, **config: Any) -> None:
        from edge_agent.agent import Agent
        from edge_agent.config import load_config

        self.device = str(config["device"])
        self.groups = tuple(config["groups"])
        path = write_agent_config(root / "agent.toml", state_dir=root / "state", **config)
        self.agent = Agent(load_config(path))
        self.agent.start()
        link = self.agent.link
        assert link is not None and link.wait_connected(15.0), f"{self.device} did not connect"

    def version(self, model: str) -> int | None:
        """The version the inference engine answers with now."""
        current = self.agent.engine.current(model)
        return None if current is None else int(current.manifest.version)

    def sha256(self, model: str) -> str | None:
        current = self.agent.engine.current(model)
        return None if current is None else str(current.sha256)

    def sequence(self, model: str, group: str | None = None) -> int | None:
        return self.agent.store.accepted_sequence(group or self.groups[0], model)

    def installed(self, sha: str) -> bool:
        return self.agent.store.is_installed(sha)

    def stop(self) -> None:
        self.agent.stop(timeout=3)


class Sensors:
    """Publishes sensor JSON on devices' input topics (QoS 1)."""

    def __init__(self, url: str, client_id: str = "sensors") -> None:
        self.link = MqttLink(LinkOptions(url=url, client_id=client_id))
        self.link.start(wait=10.0)
        self.sent = 0

    def send(self, device: str, value: float | None = None, count: int = 1) -> None:
        for _ in range(count):
            self.sent += 1
            reading = {f: value if value is not None else 0.1 * (k + 1)
                       for k, f in enumerate(FEATURES)}
            body = {**reading, "id": f"s{self.sent}"}
            self.link.publish(input_topic(device), json.dumps(body).encode(), qos=1)

    @contextlib.contextmanager
    def feeding(self, device: str, value: float, per_s: float = 50.0) -> Iterator[None]:
        """A steady stream to ``device`` in the background while the block runs (a health
        window judges the rows it gets *during* the window, so they must keep coming)."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(1.0 / per_s):
                self.send(device, value)

        thread = threading.Thread(target=run, name=f"sensors-{device}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(5.0)

    def stop(self) -> None:
        self.link.stop(timeout=2.0)


def wait_until(
    predicate: Callable[[], Any], timeout: float = 30.0, *, between: Callable[[], Any] | None = None
) -> bool:
    """Poll ``predicate``; ``between`` runs before each poll (feeding sensors, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if between is not None:
            between()
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
