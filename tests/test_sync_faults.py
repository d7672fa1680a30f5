"""Faults: an interrupted publish never exposes a manifest without its chunks and the next
pass converges; an unreachable broker or registry fails the pass, the service keeps
running, reports, backs off and converges once they are back."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from registry_sync.config import load_sync_config
from registry_sync.errors import (
    BrokerUnavailableError,
    PublishTimeoutError,
    RegistryUnavailableError,
)
from registry_sync.publisher import Publisher
from registry_sync.service import SyncService
from tests.support.broker import MosquittoBroker, free_port
from tests.support.device_sim import (
    SHARED_MODEL,
    Collector,
    SimDevice,
    log_versions,
    read_retained,
    shared_cache_dir,
    write_world,
)
from tests.support.registry import Registry

ROOT = "lineside/v1"


def test_interrupted_chunk_publish_exposes_no_manifest_and_next_pass_converges(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = log_versions(registry, SHARED_MODEL)
    registry.set_alias(name, "production", 1)
    path, keys = write_world(
        tmp_path / "sync",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=name,
        cache_dir=shared_cache_dir(),
    )
    text = path.read_text().replace(
        'device_configs = ["sim-class.toml"]',
        'device_configs = ["sim-class.toml"]\nchunk_size = 256',
    )
    path.write_text(text)
    service = SyncService(load_sync_config(path))
    service.connect()
    real = Publisher.publish_chunks

    def half_then_crash(self: Publisher, chunks: dict[str, bytes]) -> None:
        items = list(chunks.items())
        real(self, dict(items[: len(items) // 2]))
        raise PublishTimeoutError("simulated: PUBACKs stopped arriving")

    dev = SimDevice(
        broker.url,
        "pi-fault",
        groups=("line-1",),
        device_class="sim-class",
        keys=keys,
        root=ROOT,
        workdir=tmp_path / "dev",
    )
    dev.start()
    try:
        monkeypatch.setattr(Publisher, "publish_chunks", half_then_crash)
        with pytest.raises(PublishTimeoutError):
            service.reconcile()
        assert read_retained(broker.url, f"{ROOT}/manifests/#") == {}
        assert read_retained(broker.url, f"{ROOT}/chunks/#")  # half of them are there
        monkeypatch.setattr(Publisher, "publish_chunks", real)

        report = service.reconcile()
        assert len(report.published) == 1
        assert dev.wait_for(lambda d: d.version(name) == 1), dev.rejected
        assert dev.rejected == [] and dev.accepted[0].sequence == 0
    finally:
        dev.stop()
        service.close()


def test_broker_and_registry_outages_fail_the_pass_and_the_loop_recovers(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry
) -> None:
    name = log_versions(registry, SHARED_MODEL)
    registry.set_alias(name, "production", 1)

    # An unreachable registry: the pass fails with RegistryUnavailableError.
    dead = f"http://127.0.0.1:{free_port()}"
    path, _ = write_world(tmp_path / "dead", broker_url=broker.url, tracking_uri=dead, model=name)
    service = SyncService(load_sync_config(path))
    service.connect()
    events = Collector(broker.url, f"{ROOT}/sync/events", "outage-events")
    stop = threading.Event()
    loop = threading.Thread(target=service.run, args=(stop,), daemon=True)
    try:
        with pytest.raises(RegistryUnavailableError):
            service.reconcile()
        loop.start()  # keeps failing, reporting and backing off
        assert events.wait_for(
            lambda c: sum(e.get("code") == "pass_failed" for e in c.json()) >= 2, timeout=60
        )
        assert loop.is_alive()
        assert "RegistryUnavailableError" not in json.dumps(events.json())  # message only
    finally:
        stop.set()
        service.wake.set()
        loop.join(20)
        events.stop()

    # An unreachable broker: the pass fails, the link reconnects, the next pass converges.
    path, keys = write_world(
        tmp_path / "live",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=name,
        cache_dir=shared_cache_dir(),
    )
    service = SyncService(load_sync_config(path))
    service.connect()
    try:
        broker.stop()
        with pytest.raises(BrokerUnavailableError):
            service.reconcile()
        broker.start()
        assert service.link is not None and service.link.wait_connected(20)
        assert len(service.reconcile().published) == 1
    finally:
        service.close()

    with pytest.raises(BrokerUnavailableError):  # `sync once` with no broker at all
        broker.stop()
        SyncService(load_sync_config(path)).connect()
    _: Any = keys
