"""registry_sync end to end against a real MLflow sqlite store and a real Mosquitto:
promote, idempotency, rollback, stale chunks, broker restart (a single group, a staged
rollout's groups, an undeploy), loss of local state."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.mqtt import LinkOptions, MqttLink
from registry_sync.config import load_sync_config
from registry_sync.service import SyncService
from tests.support.broker import MosquittoBroker
from tests.support.device_sim import (
    SHARED_MODEL,
    SimDevice,
    log_versions,
    read_retained,
    shared_cache_dir,
    write_world,
)
from tests.support.registry import Registry

ROOT = "lineside/v1"
PLAN = 'groups = ["canary", "line-1"]\nmin_devices = 1\nhealthy_for_s = 0\nmax_error_rate = 0.05'


@pytest.fixture(scope="module")
def versions(registry: Registry) -> str:
    return log_versions(registry, SHARED_MODEL)


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    return shared_cache_dir()


@pytest.fixture
def world(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry, versions: str, cache_dir: Path
) -> Iterator[tuple[SyncService, dict[str, bytes], Path]]:
    path, keys = write_world(
        tmp_path / "sync",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=versions,
        cache_dir=cache_dir,
    )
    service = SyncService(load_sync_config(path))
    service.connect()
    yield service, keys, path
    service.close()


def device(broker: MosquittoBroker, keys: dict[str, bytes], tmp: Path, name: str) -> SimDevice:
    dev = SimDevice(
        broker.url,
        name,
        groups=("line-1",),
        device_class="sim-class",
        keys=keys,
        root=ROOT,
        workdir=tmp / name,
    )
    dev.start()
    return dev


def manifests(broker: MosquittoBroker) -> dict[str, dict[str, Any]]:
    return {t: json.loads(p) for t, p in read_retained(broker.url, f"{ROOT}/manifests/#").items()}


def test_promote_delivers_exact_bundle_and_second_pass_is_idempotent(
    world: Any, broker: MosquittoBroker, registry: Registry, versions: str, tmp_path: Path
) -> None:
    service, keys, _ = world
    registry.set_alias(versions, "production", 1)
    report = service.reconcile()
    assert [(p["group"], p["version"]) for p in report.published] == [("line-1", 1)]

    dev = device(broker, keys, tmp_path, "pi-1")
    try:
        assert dev.wait_for(lambda d: d.version(versions) == 1), dev.rejected
        active = dev.active[versions]
        assert active.manifest.selector.kind == "alias"
        assert active.manifest.selector.value == "production"
        assert active.manifest.variant == "onnx-fp32"  # onnx-int8 does not apply: skipped
        bundle = service.builder.bundle_for(versions, 1, service.config.build.device_classes)
        assert active.data == (bundle.path / "model.onnx").read_bytes()
        assert hashlib.sha256(active.data).hexdigest() == active.manifest.model_sha256
        assert active.manifest.feature_names == ("vibration", "temp", "current")
    finally:
        dev.stop()

    again = service.reconcile()
    assert again.published == [] and again.messages_sent == 0


def test_alias_moved_back_rolls_back_with_higher_sequence_and_clears_stale_chunks(
    world: Any, broker: MosquittoBroker, registry: Registry, versions: str, tmp_path: Path
) -> None:
    service, keys, _ = world
    registry.set_alias(versions, "production", 2)
    service.reconcile()
    dev = device(broker, keys, tmp_path, "pi-2")
    try:
        assert dev.wait_for(lambda d: d.version(versions) == 2), dev.rejected
        seq_v2 = dev.active[versions].manifest.sequence
        v2_chunks = set(dev.active[versions].manifest.model_entry.chunks)

        registry.set_alias(versions, "production", 1)
        report = service.reconcile()
        assert [p["version"] for p in report.published] == [1]
        assert report.cleared_chunks == len(v2_chunks)
        assert dev.wait_for(lambda d: d.version(versions) == 1), dev.rejected
        rolled = dev.active[versions].manifest
        assert rolled.sequence > seq_v2 and rolled.version == 1
    finally:
        dev.stop()

    retained_chunks = read_retained(broker.url, f"{ROOT}/chunks/#")
    ids = {t.rsplit("/", 1)[1] for t in retained_chunks}
    assert ids == set(rolled.model_entry.chunks)  # v2's chunks were cleared
    assert not ids & v2_chunks


def test_broker_restart_without_persistence_republishes_the_same_bytes(
    world: Any, broker: MosquittoBroker, registry: Registry, versions: str, tmp_path: Path
) -> None:
    service, keys, _ = world
    registry.set_alias(versions, "production", 1)
    service.reconcile()
    before = read_retained(broker.url, f"{ROOT}/manifests/#")
    assert len(before) == 1

    broker.restart(persistence=False)
    assert read_retained(broker.url, f"{ROOT}/manifests/#") == {}
    assert service.link is not None and service.link.wait_connected(15.0)
    report = service.reconcile()
    assert len(report.published) == 1
    assert read_retained(broker.url, f"{ROOT}/manifests/#") == before  # not re-signed

    dev = device(broker, keys, tmp_path, "pi-3")  # a device that missed everything
    try:
        assert dev.wait_for(lambda d: d.version(versions) == 1), dev.rejected
    finally:
        dev.stop()


def chunk_topics(broker: MosquittoBroker) -> set[str]:
    return {t.rsplit("/", 1)[1] for t in read_retained(broker.url, f"{ROOT}/chunks/#")}


def named_chunks(wires: dict[str, bytes]) -> set[str]:
    return {
        c for w in wires.values() for f in json.loads(w)["signed"]["files"] for c in f["chunks"]
    }


def fake_device_active(
    service: SyncService, link: MqttLink, device: str, model: str, group: str, version: int
) -> None:
    """What an agent reports after activating ``version`` from ``group`` and passing its
    health window (docs/protocol.md sections 8.1 and 8.2)."""
    context = {"device": device, "model": model, "version": version, "sequence": 0}
    events = f"{ROOT}/devices/{device}/events"
    activated = {"ts": time.time(), "kind": "update", "code": "activated", "group": group}
    link.publish(events, json.dumps({**activated, **context}), 1).wait(5)
    state = {
        "ts": time.time(),
        "device": device,
        "online": True,
        "models": {model: {"version": version, "sequence": 0, "serving": True}},
    }
    link.publish(f"{ROOT}/devices/{device}/state", json.dumps(state), 1, True).wait(5)
    healthy = {"ts": time.time(), "kind": "health", "code": "healthy"}
    link.publish(events, json.dumps({**healthy, **context}), 1).wait(5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rec = service.view.snapshot().get(device)
        if (
            rec
            and rec.models.get(model, {}).get("version") == version
            and any(e.get("code") == "healthy" for e in rec.events)
        ):
            return
        time.sleep(0.02)
    raise AssertionError(f"the service never saw {device} run v{version}")


def test_broker_restart_restores_every_group_of_a_staged_rollout(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry, versions: str, cache_dir: Path
) -> None:
    """v1 reached both groups; v2 is staged on the canary only. A broker that lost its
    retained state gets back both: the canary's v2 and line-1's v1, same bytes, with
    every chunk they name."""
    path, _keys = write_world(
        tmp_path / "staged",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=versions,
        groups=("canary", "line-1"),
        rollout=PLAN,
        cache_dir=cache_dir,
    )
    service = SyncService(load_sync_config(path))
    service.connect()
    fake = MqttLink(LinkOptions(url=broker.url, client_id="fake-agents"))
    fake.start(wait=10.0)
    try:
        registry.set_alias(versions, "production", 1)
        service.reconcile()
        fake_device_active(service, fake, "canary-1", versions, "canary", 1)
        service.reconcile()  # the gate holds on the canary: line-1 gets v1
        fake_device_active(service, fake, "line-1-a", versions, "line-1", 1)
        service.reconcile()  # complete
        registry.set_alias(versions, "production", 2)
        service.reconcile()  # v2 on the canary only; line-1 keeps v1
        before = read_retained(broker.url, f"{ROOT}/manifests/#")
        assert {t: json.loads(w)["signed"]["version"] for t, w in before.items()} == {
            f"{ROOT}/manifests/canary/{versions}": 2,
            f"{ROOT}/manifests/line-1/{versions}": 1,
        }
        assert named_chunks(before) <= chunk_topics(broker)
        assert service.reconcile().published == []  # steady state: nothing re-sent

        broker.restart(persistence=False)
        assert read_retained(broker.url, f"{ROOT}/#") == {}
        assert service.link is not None and service.link.wait_connected(15.0)
        report = service.reconcile()
        assert sorted((p["group"], p["version"], p["republished"]) for p in report.published) == [
            ("canary", 2, True),
            ("line-1", 1, True),
        ]
        assert read_retained(broker.url, f"{ROOT}/manifests/#") == before  # not re-signed
        assert named_chunks(before) <= chunk_topics(broker)
        assert service.reconcile().published == []
    finally:
        fake.stop()
        service.close()


def test_broker_restart_restores_an_undeploy_manifest(
    world: Any, broker: MosquittoBroker, registry: Registry, versions: str, tmp_path: Path
) -> None:
    service, keys, _ = world
    registry.set_alias(versions, "production", 1)
    service.reconcile()
    registry.client().delete_registered_model_alias(versions, "production")
    try:
        (withdrawn,) = service.reconcile().published
        assert withdrawn["undeployed"] is True
        before = read_retained(broker.url, f"{ROOT}/manifests/#")
        (signed,) = [json.loads(w)["signed"] for w in before.values()]
        assert signed["undeployed"] is True

        broker.restart(persistence=False)
        assert read_retained(broker.url, f"{ROOT}/#") == {}
        assert service.link is not None and service.link.wait_connected(15.0)
        (again,) = service.reconcile().published
        assert again["undeployed"] is True and again["republished"] is True
        assert read_retained(broker.url, f"{ROOT}/manifests/#") == before
        assert named_chunks(before) <= chunk_topics(broker)

        dev = device(broker, keys, tmp_path, "pi-late")  # missed the deploy and the restart
        try:
            assert dev.wait_for(lambda d: d.undeployed.get(versions) is True), dev.rejected
        finally:
            dev.stop()
    finally:
        registry.set_alias(versions, "production", 1)


def test_sequence_survives_loss_of_local_state(
    world: Any, broker: MosquittoBroker, registry: Registry, versions: str
) -> None:
    service, _keys, path = world
    registry.set_alias(versions, "production", 1)
    service.reconcile()
    (seq1,) = [m["signed"]["sequence"] for m in manifests(broker).values()]
    service.close()
    shutil.rmtree(service.config.state_dir)

    fresh = SyncService(load_sync_config(path))
    fresh.connect()
    try:
        assert fresh.reconcile().published == []  # same content: read back, not re-signed
        registry.set_alias(versions, "production", 2)
        fresh.reconcile()
        (m,) = manifests(broker).values()
        assert m["signed"]["version"] == 2 and m["signed"]["sequence"] == seq1 + 1
    finally:
        fresh.close()


def test_expiring_manifests_are_renewed_at_half_life(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry, versions: str, cache_dir: Path
) -> None:
    path, _ = write_world(
        tmp_path / "exp",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=versions,
        cache_dir=cache_dir,
    )
    path.write_text(
        path.read_text().replace(
            'key = "keys/release.pem"\n', 'key = "keys/release.pem"\nexpires_after_s = 100\n'
        )
    )
    now = [1_900_000_000.0]
    service = SyncService(load_sync_config(path), clock=lambda: now[0])
    service.connect()
    try:
        registry.set_alias(versions, "production", 1)
        service.reconcile()
        (first,) = [m["signed"] for m in manifests(broker).values()]
        assert first["expires_at"] == first["issued_at"] + 100
        now[0] += 40
        assert service.reconcile().published == []
        now[0] += 20  # past half of its life: re-signed, same content, next sequence
        assert len(service.reconcile().published) == 1
        (second,) = [m["signed"] for m in manifests(broker).values()]
        assert second["sequence"] == first["sequence"] + 1
        assert second["files"] == first["files"] and second["issued_at"] == first["issued_at"] + 60
    finally:
        service.close()
