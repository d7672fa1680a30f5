"""Faults: an interrupted publish never exposes a manifest without its chunks and the next
pass converges; an unreachable broker or registry fails the pass, the service keeps
running, reports, backs off and converges once they are back; a conversion that failed
for a passing reason is retried (with backoff), a deterministic failure is not; one
model's unexpected failure is reported and the other models still converge."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from converter.errors import ModelLoadError, UnsupportedModelError
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
    path, _keys = write_world(
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


def test_transient_conversion_failure_is_retried_with_backoff_deterministic_one_is_cached(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry
) -> None:
    from converter.pipeline import convert as real_convert

    name = log_versions(registry, SHARED_MODEL)
    calls: list[str] = []
    outage = [True]  # the artifact store cannot serve the model while this is set

    def convert(uri: str, out_dir: Path, **kw: Any) -> Any:
        calls.append(uri)
        if uri.endswith("/2"):
            raise UnsupportedModelError(f"{uri}: simulated: this flavor cannot be converted")
        if outage[0]:
            raise ModelLoadError(f"{uri}: simulated: the artifact download was cut off")
        return real_convert(uri, out_dir, **kw)

    path, _keys = write_world(
        tmp_path / "sync",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=name,
        cache_dir=tmp_path / "cache",  # its own cache: the conversion really runs here
    )
    now = [1_900_000_000.0]
    service = SyncService(load_sync_config(path), clock=lambda: now[0], convert=convert)
    service.connect()
    events = Collector(broker.url, f"{ROOT}/sync/events", "retry-events")
    try:
        registry.set_alias(name, "production", 1)
        first = service.reconcile()
        assert first.published == [] and len(first.failed) == 1
        assert "artifact download was cut off" in first.failed[0]
        assert len(calls) == 1  # onnx-int8 is tried first and failed: nothing cached
        assert not list((tmp_path / "cache").rglob("result.json"))
        assert events.wait_for(
            lambda c: any(
                e.get("code") == "build_retry" and "cut off" in e.get("message", "")
                for e in c.json()
            )
        )

        outage[0] = False
        again = service.reconcile()  # same instant: still backing off, no new attempt
        assert again.published == [] and again.failed and len(calls) == 1

        now[0] += service.config.retry_max_s + 1  # past any backoff: tried again, converges
        report = service.reconcile()
        assert [p["version"] for p in report.published] == [1] and report.failed == []
        assert len(calls) == 3  # onnx-int8 (skipped: it does not apply), then onnx-fp32
        assert read_retained(broker.url, f"{ROOT}/manifests/#")

        # A deterministic failure is an answer: cached, blocked, never converted again.
        registry.set_alias(name, "production", 2)
        blocked = service.reconcile()
        assert blocked.blocked and "cannot be converted" in blocked.blocked[0]
        assert blocked.failed == [] and len(calls) == 4
        now[0] += 3600
        assert service.reconcile().blocked and len(calls) == 4
    finally:
        events.stop()
        service.close()
        registry.set_alias(name, "production", 1)


def test_one_models_unexpected_failure_does_not_stop_the_others(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry
) -> None:
    good = log_versions(registry, SHARED_MODEL)
    bad = log_versions(registry, "sync-corrupt-cache-model", count=1)
    registry.set_alias(good, "production", 1)
    registry.set_alias(bad, "production", 1)
    path, _keys = write_world(
        tmp_path / "sync",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=bad,  # first in the config: it fails before the good one is handled
        cache_dir=shared_cache_dir(),
        extra=f'[[models]]\nname = "{good}"\nalias = "production"\n',
    )
    service = SyncService(load_sync_config(path))
    # A corrupted cache entry for the bad model: "written", but its metadata is empty, so
    # describing it in a manifest raises KeyError, an error no code path expects.
    entry = service.builder._entry(bad, 1, "onnx-int8")
    (entry / "onnx-int8").mkdir(parents=True, exist_ok=True)
    corrupt = {"status": "written", "reason": "", "parity": None, "sha256": "0" * 64}
    (entry / "result.json").write_text(json.dumps({**corrupt, "metadata": {}}))
    service.connect()
    events = Collector(broker.url, f"{ROOT}/sync/events", "failure-events")
    try:
        report = service.reconcile()
        assert [(p["model"], p["version"]) for p in report.published] == [(good, 1)]
        (failure,) = report.failed
        assert failure.startswith(f"{bad}: KeyError")
        assert set(read_retained(broker.url, f"{ROOT}/manifests/#")) == {
            f"{ROOT}/manifests/line-1/{good}"
        }
        assert events.wait_for(
            lambda c: any(
                e.get("code") == "model_failed" and e.get("model") == bad for e in c.json()
            )
        )
        again = service.reconcile()  # reported again, the good model stays converged
        assert again.published == [] and len(again.failed) == 1
    finally:
        events.stop()
        service.close()
