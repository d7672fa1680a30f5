"""registry_sync end to end against a real MLflow sqlite store and a real Mosquitto:
promote, idempotency, rollback, stale chunks, broker restart, loss of local state."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
