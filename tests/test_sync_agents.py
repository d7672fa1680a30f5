"""registry_sync driving real edge agents: MLflow (sqlite store, models logged with MLflow's
APIs) -> the sync service -> a real Mosquitto -> in-process ``edge_agent.agent.Agent``s
(MQTT link, updater, onnxruntime inference, outbox, telemetry), and back: the agents' own
state, events and telemetry are what the staged-rollout gate reads.

- promote (set the alias) -> the agent serves the new version; the alias moved back -> it
  serves the older one again from a new manifest with a higher sequence;
- a legacy stage transition to Production deploys;
- staged rollout canary -> line: the line group gets the manifest only once the canary
  agent has reported the version active, passed its own health window and stayed so for
  ``healthy_for_s`` (the service's clock is moved forward instead of sleeping);
- a version whose float32 outputs overflow on live readings (finite on the parity sample
  and the golden pairs, so it is built, signed and passes the agent's smoke test) is rolled
  back by the canary agent's health window: the gate fails, the rollout halts, the canary
  is reverted and the line group never gets the manifest;
- a version the canary agent refuses (its smoke test: an input the device does not map)
  fails the gate at once, with no stage timeout configured;
- the broker restarted without persistence: the service republishes the very bytes it
  signed and the agent, which runs them, keeps serving without re-accepting anything.

One broker, one registry and two sync services (a plain one and a staged one, different
models) are shared by the module; the tests of each service run in order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from edge_agent.protocol.predictions import iter_predictions
from registry_sync.config import load_sync_config
from registry_sync.service import SyncService
from tests.support.broker import MosquittoBroker, running_broker
from tests.support.device_sim import Collector, read_retained, shared_cache_dir, write_world
from tests.support.registry import Registry
from tests.support.sync_agents import (
    OVERFLOW_INPUT,
    ROOT,
    EdgeAgent,
    Sensors,
    log_classifier,
    log_overflowing_regressor,
    wait_until,
)

ALIAS_MODEL = "agents-alias-model"
STAGE_MODEL = "agents-stage-model"
STAGED_MODEL = "agents-staged-model"
T = 600.0  # healthy_for_s of the staged plan; the service's clock jumps instead of waiting
PLAN = (
    'groups = ["canary", "line-2"]\nmin_devices = 1\n'
    f"healthy_for_s = {T:g}\nmax_error_rate = 0.05\nrevert_on_failure = true"
)


@pytest.fixture(scope="module")
def mqtt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with running_broker(tmp_path_factory.mktemp("agents-broker")) as b:
        yield b


@pytest.fixture(scope="module")
def sensors(mqtt: MosquittoBroker) -> Iterator[Sensors]:
    s = Sensors(mqtt.url, "agents-sensors")
    yield s
    s.stop()


def retained(broker: MosquittoBroker, model: str) -> dict[str, dict[str, Any]]:
    """group -> the signed part of the retained manifest of ``model``."""
    out = {}
    for topic, payload in read_retained(broker.url, f"{ROOT}/manifests/+/{model}").items():
        out[topic.split("/")[-2]] = json.loads(payload)["signed"]
    return out


def model_sha(signed: dict[str, Any]) -> str:
    (entry,) = [f for f in signed["files"] if f["path"] == signed["model_file"]]
    return str(entry["sha256"])


# ---- a plain service: one group, an alias-selected and a stage-selected model ----------------


@dataclass
class Plain:
    service: SyncService
    agent: EdgeAgent
    predictions: Collector


@pytest.fixture(scope="module")
def plain(
    tmp_path_factory: pytest.TempPathFactory, mqtt: MosquittoBroker, registry: Registry
) -> Iterator[Plain]:
    tmp = tmp_path_factory.mktemp("agents-plain")
    assert log_classifier(registry, ALIAS_MODEL, 1.0) == 1
    assert log_classifier(registry, ALIAS_MODEL, 3.0) == 2
    assert log_classifier(registry, STAGE_MODEL, 2.0) == 1
    path, keys = write_world(
        tmp / "sync",
        broker_url=mqtt.url,
        tracking_uri=registry.tracking_uri,
        model=ALIAS_MODEL,
        cache_dir=shared_cache_dir(),
        fleet="history = false",
        extra=f'[[models]]\nname = "{STAGE_MODEL}"\nstage = "Production"\n',
    )
    service = SyncService(load_sync_config(path))
    service.connect()
    agent = EdgeAgent(
        tmp / "gw-a",
        device="gw-a",
        url=mqtt.url,
        keys=keys,
        groups=["line-1"],
        models=[ALIAS_MODEL, STAGE_MODEL],
    )
    predictions = Collector(mqtt.url, f"{ROOT}/devices/gw-a/predictions", "agents-predictions")
    yield Plain(service, agent, predictions)
    predictions.stop()
    agent.stop()
    service.close()


def answered_by(col: Collector, model: str, sensor_id: str) -> int | None:
    """The version that answered sensor message ``sensor_id`` for ``model``, if any."""
    for body in col.json():
        for p in iter_predictions(body):
            if p["model"] == model and p["source"].get("id") == sensor_id:
                return int(p["version"])
    return None


def serves(w: Plain, sensors: Sensors, model: str, version: int) -> None:
    """The agent's engine answers a fresh sensor message with ``version`` (a few tries:
    after a broker restart the collector may resubscribe after the first answer left)."""
    for _ in range(4):
        sensors.send("gw-a")
        sid = f"s{sensors.sent}"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            answered = answered_by(w.predictions, model, sid)
            if answered is not None:
                assert answered == version
                return
            time.sleep(0.05)
    raise AssertionError(f"no prediction of {model} for the last 4 sensor messages")


def test_promote_serves_the_new_version_and_moving_the_alias_back_rolls_back(
    plain: Plain, mqtt: MosquittoBroker, registry: Registry, sensors: Sensors
) -> None:
    svc, agent = plain.service, plain.agent
    registry.set_alias(ALIAS_MODEL, "production", 1)
    report = svc.reconcile()
    assert [(p["group"], p["version"]) for p in report.published] == [("line-1", 1)]
    assert wait_until(lambda: agent.version(ALIAS_MODEL) == 1, 30)
    v1 = retained(mqtt, ALIAS_MODEL)["line-1"]
    assert agent.sha256(ALIAS_MODEL) == model_sha(v1)
    serves(plain, sensors, ALIAS_MODEL, 1)

    # promote: the alias moves to version 2
    registry.set_alias(ALIAS_MODEL, "production", 2)
    report = svc.reconcile()
    assert [(p["group"], p["version"]) for p in report.published] == [("line-1", 2)]
    v2 = retained(mqtt, ALIAS_MODEL)["line-1"]
    assert wait_until(lambda: agent.sha256(ALIAS_MODEL) == model_sha(v2), 30)
    assert agent.version(ALIAS_MODEL) == 2 and model_sha(v2) != model_sha(v1)
    assert agent.sequence(ALIAS_MODEL) == v2["sequence"] > v1["sequence"]
    serves(plain, sensors, ALIAS_MODEL, 2)

    # the alias moved back: a new manifest of version 1 with a higher sequence
    registry.set_alias(ALIAS_MODEL, "production", 1)
    report = svc.reconcile()
    assert [(p["group"], p["version"]) for p in report.published] == [("line-1", 1)]
    back = retained(mqtt, ALIAS_MODEL)["line-1"]
    assert back["version"] == 1 and back["sequence"] > v2["sequence"]
    assert wait_until(lambda: agent.sequence(ALIAS_MODEL) == back["sequence"], 30)
    assert agent.version(ALIAS_MODEL) == 1 and agent.sha256(ALIAS_MODEL) == model_sha(v1)
    serves(plain, sensors, ALIAS_MODEL, 1)
    assert svc.reconcile().published == []  # settled


def test_legacy_stage_transition_to_production_deploys(
    plain: Plain, mqtt: MosquittoBroker, registry: Registry, sensors: Sensors
) -> None:
    svc, agent = plain.service, plain.agent
    assert svc.reconcile().published == [] and agent.version(STAGE_MODEL) is None
    registry.transition(STAGE_MODEL, 1, "Production")
    report = svc.reconcile()
    assert [(p["group"], p["model"], p["version"]) for p in report.published] == [
        ("line-1", STAGE_MODEL, 1)
    ]
    assert wait_until(lambda: agent.version(STAGE_MODEL) == 1, 30)
    current = agent.agent.engine.current(STAGE_MODEL)
    assert current is not None
    assert (current.manifest.selector.kind, current.manifest.selector.value) == (
        "stage",
        "Production",
    )
    assert agent.sha256(STAGE_MODEL) == model_sha(retained(mqtt, STAGE_MODEL)["line-1"])
    serves(plain, sensors, STAGE_MODEL, 1)


# ---- a staged service: canary -> line-2 ------------------------------------------------------


@dataclass
class Staged:
    service: SyncService
    canary: EdgeAgent
    line: EdgeAgent
    skew: list[float]
    registry: Registry
    broker: MosquittoBroker
    done: set[int] = field(default_factory=set)

    def tick(self, seconds: float) -> None:
        """Move the service's clock forward (the agents keep real time)."""
        self.skew[0] += seconds

    def status(self) -> dict[str, Any]:
        doc = json.loads((self.service.config.state_dir / "rollouts.json").read_text())
        return dict(doc[STAGED_MODEL])

    def groups(self) -> dict[str, int]:
        return {g: int(s["version"]) for g, s in retained(self.broker, STAGED_MODEL).items()}

    def seen(self, device: str, check: Any, timeout: float = 30.0) -> bool:
        """Wait until the service's fleet view of ``device`` passes ``check``."""

        def ok() -> bool:
            rec = self.service.view.snapshot().get(device)
            return rec is not None and bool(check(rec))

        return wait_until(ok, timeout)


def has_event(code: str, version: int) -> Any:
    return lambda rec: any(
        e.get("code") == code and e.get("model") == STAGED_MODEL and e.get("version") == version
        for e in rec.events
    )


def shows(version: int) -> Any:
    return lambda rec: rec.online and rec.models.get(STAGED_MODEL, {}).get("version") == version


@pytest.fixture(scope="module")
def staged(
    tmp_path_factory: pytest.TempPathFactory, mqtt: MosquittoBroker, registry: Registry
) -> Iterator[Staged]:
    tmp = tmp_path_factory.mktemp("agents-staged")
    assert log_classifier(registry, STAGED_MODEL, 1.0) == 1
    assert log_overflowing_regressor(registry, STAGED_MODEL) == 2
    assert log_classifier(registry, STAGED_MODEL, 2.0, extra_features=("rpm",)) == 3
    path, keys = write_world(
        tmp / "sync",
        broker_url=mqtt.url,
        tracking_uri=registry.tracking_uri,
        model=STAGED_MODEL,
        groups=("canary", "line-2"),
        rollout=PLAN,
        cache_dir=shared_cache_dir(),
        fleet="history = false",
    )
    skew = [0.0]
    service = SyncService(load_sync_config(path), clock=lambda: time.time() + skew[0])
    service.connect()
    common: dict[str, Any] = {"url": mqtt.url, "keys": keys, "models": [STAGED_MODEL]}
    # The canary's health window is long enough to collect the rows that judge it.
    canary = EdgeAgent(tmp / "canary-1", device="canary-1", groups=["canary"], window_s=3, **common)
    line = EdgeAgent(tmp / "line-a", device="line-a", groups=["line-2"], window_s=1, **common)
    yield Staged(service, canary, line, skew, registry, mqtt)
    line.stop()
    canary.stop()
    service.close()


def roll_out_v1(w: Staged) -> None:
    """Version 1 through the canary to line-2, checking the gate at every step."""
    if 1 in w.done:
        return
    w.registry.set_alias(STAGED_MODEL, "production", 1)
    w.service.reconcile()
    assert w.groups() == {"canary": 1}
    assert w.status()["status"] == "in_progress"
    assert wait_until(lambda: w.canary.version(STAGED_MODEL) == 1, 30)
    assert w.seen("canary-1", shows(1))

    # Active on the canary, but neither past its health window nor healthy for T: hold.
    w.service.reconcile()
    assert w.groups() == {"canary": 1}
    assert w.status()["reason"].startswith("waiting: 0 of 1")
    # The agent's window passed (its "healthy" event); still not T seconds: hold.
    assert w.seen("canary-1", has_event("healthy", 1))
    w.service.reconcile()
    assert w.groups() == {"canary": 1}
    assert w.line.version(STAGED_MODEL) is None

    w.tick(T)  # T seconds of the service's time later, still active, online and healthy
    w.service.reconcile()
    assert w.groups() == {"canary": 1, "line-2": 1}
    status = w.status()
    assert status["status"] == "in_progress" and status["stage"] == 1
    assert any("gate passed on canary" in h["event"] for h in status["history"])
    assert wait_until(lambda: w.line.version(STAGED_MODEL) == 1, 30)
    assert w.line.sha256(STAGED_MODEL) == w.canary.sha256(STAGED_MODEL)

    assert w.seen("line-a", has_event("healthy", 1))
    w.service.reconcile()
    assert w.status()["status"] == "in_progress"  # line-2 not healthy for T yet
    w.tick(T)
    w.service.reconcile()
    assert w.status()["status"] == "complete"
    w.done.add(1)


def test_staged_rollout_advances_once_the_canary_agent_is_healthy_for_healthy_for_s(
    staged: Staged,
) -> None:
    roll_out_v1(staged)


def test_a_version_the_canary_agent_rolls_back_halts_the_rollout_before_the_line(
    staged: Staged, sensors: Sensors
) -> None:
    w = staged
    roll_out_v1(w)
    line_sequence = w.line.sequence(STAGED_MODEL)
    w.registry.set_alias(STAGED_MODEL, "production", 2)
    with sensors.feeding("canary-1", OVERFLOW_INPUT):
        w.service.reconcile()
        before = retained(w.broker, STAGED_MODEL)
        assert {g: s["version"] for g, s in before.items()} == {"canary": 2, "line-2": 1}
        bad_sha = model_sha(before["canary"])
        # Live readings the plant really sends: version 1 answers them, version 2's
        # float32 outputs overflow. They flow before, during and after its health window.
        assert wait_until(
            lambda: has_event("rolled_back", 2)(w.service.view.snapshot()["canary-1"]), 60
        ), [e.get("code") for e in w.service.view.snapshot()["canary-1"].events]

    rec = w.service.view.snapshot()["canary-1"]
    assert has_event("activated", 2)(rec)  # served, then rolled back: not a refusal
    (rolled,) = [e for e in rec.events if e.get("code") == "rolled_back"]
    assert "NaN or infinite" in rolled["message"]
    assert w.canary.version(STAGED_MODEL) == 1
    assert w.canary.agent.store.is_bad(bad_sha)

    w.service.reconcile()
    status = w.status()
    assert status["status"] == "halted" and status["reverted"] is True
    assert "device canary-1 rolled back" in status["reason"]
    after = retained(w.broker, STAGED_MODEL)
    # the canary got version 1 back (a new manifest), line-2 still has its version 1 manifest
    assert after["canary"]["version"] == 1
    assert after["canary"]["sequence"] > before["canary"]["sequence"]
    assert after["line-2"] == before["line-2"]
    assert wait_until(
        lambda: w.canary.sequence(STAGED_MODEL) == after["canary"]["sequence"], 30
    )
    assert w.canary.version(STAGED_MODEL) == 1
    # line-2 never saw version 2
    assert w.line.version(STAGED_MODEL) == 1
    assert w.line.sequence(STAGED_MODEL) == line_sequence
    assert not w.line.installed(bad_sha)
    line_rec = w.service.view.snapshot()["line-a"]
    assert not any(e.get("version") == 2 for e in line_rec.events)
    # halted stays halted: nothing more is sent while the alias still names version 2
    w.tick(T)
    assert w.service.reconcile().published == []
    assert w.status()["status"] == "halted" and w.groups() == {"canary": 1, "line-2": 1}



def test_a_version_the_canary_agent_refuses_fails_the_gate_without_waiting(
    staged: Staged,
) -> None:
    w = staged
    roll_out_v1(w)
    line_sequence = w.line.sequence(STAGED_MODEL)
    # Version 3 needs an input ("rpm") the devices do not map: signed, delivered, and
    # refused by the agent's smoke test. No timeout is configured: before refusals counted
    # the gate would have waited for a healthy canary forever.
    w.registry.set_alias(STAGED_MODEL, "production", 3)
    w.service.reconcile()
    before = retained(w.broker, STAGED_MODEL)
    assert {g: s["version"] for g, s in before.items()} == {"canary": 3, "line-2": 1}
    assert w.seen("canary-1", has_event("schema_mismatch", 3)), [
        e.get("code") for e in w.service.view.snapshot()["canary-1"].events
    ]
    assert w.canary.version(STAGED_MODEL) == 1  # the refused version never served

    w.service.reconcile()
    status = w.status()
    assert status["status"] == "halted" and status["version"] == 3
    assert status["reason"].startswith(
        f"device canary-1 refused {STAGED_MODEL} v3 (schema_mismatch: model input(s) rpm"
    )
    after = retained(w.broker, STAGED_MODEL)
    assert after["canary"]["version"] == 1 and after["line-2"] == before["line-2"]
    assert wait_until(
        lambda: w.canary.sequence(STAGED_MODEL) == after["canary"]["sequence"], 30
    )
    assert w.line.version(STAGED_MODEL) == 1
    assert w.line.sequence(STAGED_MODEL) == line_sequence


# ---- last: it restarts the module's broker ---------------------------------------------------


def test_broker_restarted_without_persistence_gets_the_same_bytes_and_the_agent_keeps_serving(
    plain: Plain, mqtt: MosquittoBroker, registry: Registry, sensors: Sensors
) -> None:
    svc, agent = plain.service, plain.agent
    registry.set_alias(ALIAS_MODEL, "production", 2)
    svc.reconcile()
    assert wait_until(lambda: agent.version(ALIAS_MODEL) == 2, 30)
    before = read_retained(mqtt.url, f"{ROOT}/manifests/+/{ALIAS_MODEL}")
    sequence = agent.sequence(ALIAS_MODEL)
    assert len(before) == 1 and sequence is not None

    mqtt.restart(persistence=False)  # every retained manifest and chunk is gone
    assert read_retained(mqtt.url, f"{ROOT}/manifests/+/{ALIAS_MODEL}") == {}
    assert svc.link is not None and svc.link.wait_connected(15.0)
    report = svc.reconcile()
    assert (ALIAS_MODEL, 2) in [(p["model"], p["version"]) for p in report.published]
    assert read_retained(mqtt.url, f"{ROOT}/manifests/+/{ALIAS_MODEL}") == before  # not re-signed

    link = agent.agent.link
    assert link is not None and link.wait_connected(30.0)
    assert sensors.link.wait_connected(30.0) and plain.predictions.link.wait_connected(30.0)
    # The agent got the very manifest it runs: skipped, nothing re-accepted, still serving.
    serves(plain, sensors, ALIAS_MODEL, 2)
    assert agent.sequence(ALIAS_MODEL) == sequence and agent.version(ALIAS_MODEL) == 2
