"""The shared fixtures themselves: the broker restarts with its config; models register."""

from __future__ import annotations

import numpy as np
import paho.mqtt.client as mqtt
from sklearn.linear_model import LogisticRegression

from tests.support.broker import MosquittoBroker


def _connect(port: int) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    return client


def test_broker_keeps_retained_with_persistence_and_loses_without(broker: MosquittoBroker) -> None:
    broker.restart(persistence=True)
    c = _connect(broker.port)
    c.loop_start()
    c.publish("t/retained", b"x", qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()
    broker.restart()
    got: list[bytes] = []
    c = _connect(broker.port)
    c.on_message = lambda _c, _u, m: got.append(m.payload)
    c.subscribe("t/#", qos=1)
    c.loop_start()
    import time

    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    c.loop_stop()
    c.disconnect()
    assert got == [b"x"]
    broker.restart(persistence=False)
    got.clear()
    c = _connect(broker.port)
    c.on_message = lambda _c, _u, m: got.append(m.payload)
    c.subscribe("t/#", qos=1)
    c.loop_start()
    time.sleep(0.5)
    c.loop_stop()
    c.disconnect()
    assert got == []


def test_registry_registers_skops_and_pickle_models(registry, model_name) -> None:  # type: ignore[no-untyped-def]
    X = np.random.default_rng(0).normal(size=(50, 3))
    y = (X[:, 0] > 0).astype(int)
    model = LogisticRegression().fit(X, y)
    registry.log_sklearn(model, X, name="m", registered_name=model_name)
    registry.log_sklearn(
        model, X, name="m", registered_name=model_name, serialization_format="cloudpickle"
    )
    registry.set_alias(model_name, "production", 2)
    mv = registry.client().get_model_version_by_alias(model_name, "production")
    assert str(mv.version) == "2"
