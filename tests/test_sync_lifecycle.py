"""Selectors and withdrawals: legacy stages deploy, a deleted alias or an archived version
undeploys with a signed manifest, a parity failure publishes nothing and is reported."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry_sync.config import load_sync_config
from registry_sync.service import SyncService
from tests.support.broker import MosquittoBroker
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


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    return shared_cache_dir()


@pytest.fixture
def make_service(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry, cache_dir: Path
) -> Iterator[Any]:
    services: list[SyncService] = []

    def make(model: str, **kw: Any) -> tuple[SyncService, dict[str, bytes]]:
        path, keys = write_world(
            tmp_path / "sync",
            broker_url=broker.url,
            tracking_uri=registry.tracking_uri,
            model=model,
            cache_dir=cache_dir,
            **kw,
        )
        service = SyncService(load_sync_config(path))
        service.connect()
        services.append(service)
        return service, keys

    yield make
    for s in services:
        s.close()


def start_device(broker: MosquittoBroker, keys: dict[str, bytes], tmp: Path) -> SimDevice:
    dev = SimDevice(
        broker.url,
        "pi-life",
        groups=("line-1",),
        device_class="sim-class",
        keys=keys,
        root=ROOT,
        workdir=tmp / "dev",
    )
    dev.start()
    return dev


def test_legacy_stage_transition_deploys_the_highest_version(
    make_service: Any, registry: Registry, broker: MosquittoBroker, tmp_path: Path
) -> None:
    name = "sync-stage-model"
    log_versions(registry, name)
    service, keys = make_service(name, selector='stage = "Production"')
    assert service.reconcile().published == []  # nothing in Production yet
    registry.transition(name, 1, "Production")
    registry.transition(name, 2, "Production")  # two in Production: the highest wins
    report = service.reconcile()
    assert [p["version"] for p in report.published] == [2]
    dev = start_device(broker, keys, tmp_path)
    try:
        assert dev.wait_for(lambda d: d.version(name) == 2), dev.rejected
        assert dev.active[name].manifest.selector.kind == "stage"
        registry.transition(name, 2, "Archived")
        service.reconcile()  # version 1 is still in Production
        assert dev.wait_for(lambda d: d.version(name) == 1), dev.rejected
    finally:
        dev.stop()


def test_deleted_alias_and_archived_version_undeploy_with_a_signed_manifest(
    make_service: Any, registry: Registry, broker: MosquittoBroker, tmp_path: Path
) -> None:
    name = "sync-undeploy-model"
    log_versions(registry, name, count=1)
    service, keys = make_service(name)
    registry.set_alias(name, "production", 1)
    service.reconcile()
    dev = start_device(broker, keys, tmp_path)
    try:
        assert dev.wait_for(lambda d: d.version(name) == 1), dev.rejected
        deployed = dev.active[name].manifest

        registry.client().delete_registered_model_alias(name, "production")
        report = service.reconcile()
        assert [p["undeployed"] for p in report.published] == [True]
        # The device's own acceptance code accepts it: signed, higher sequence, same model.
        assert dev.wait_for(lambda d: d.undeployed.get(name) is True), dev.rejected
        undeploy = dev.accepted[-1]
        assert undeploy.sequence > deployed.sequence
        assert undeploy.model_sha256 == deployed.model_sha256
        assert undeploy.extra == {"undeployed": True, "on_undeploy": "keep"}
        assert service.reconcile().published == []  # already withdrawn: idempotent

        # Back again, then archived while the alias still points at it.
        registry.set_alias(name, "production", 1)
        assert [p["undeployed"] for p in service.reconcile().published] == [False]
        assert dev.wait_for(lambda d: d.undeployed.get(name) is False), dev.rejected
        registry.transition(name, 1, "Archived")
        assert [p["undeployed"] for p in service.reconcile().published] == [True]
        assert dev.wait_for(lambda d: d.undeployed.get(name) is True), dev.rejected
    finally:
        dev.stop()
    # The undeploy keeps the chunks referenced: a device can still verify what it runs.
    chunks = read_retained(broker.url, f"{ROOT}/chunks/#")
    assert {t.rsplit("/", 1)[1] for t in chunks} == set(deployed.model_entry.chunks)


def test_parity_failure_blocks_publishes_nothing_and_reports(
    make_service: Any, registry: Registry, broker: MosquittoBroker
) -> None:
    name = log_versions(registry, SHARED_MODEL)
    # Agreement above 100% cannot be met: the fp32 variant fails the gate.
    service, _keys = make_service(name, parity="fp32_validation_agreement = 1.5")
    events = Collector(broker.url, f"{ROOT}/sync/events", "events-watch")
    try:
        registry.set_alias(name, "production", 1)
        report = service.reconcile()
        assert report.published == [] and report.blocked
        assert read_retained(broker.url, f"{ROOT}/manifests/#") == {}
        assert read_retained(broker.url, f"{ROOT}/chunks/#") == {}
        assert events.wait_for(lambda c: any(e.get("code") == "parity_failed" for e in c.json()))
        tags = registry.client().get_model_version(name, "1").tags
        assert "parity gate failed" in tags["lineside.parity_failed"]
    finally:
        events.stop()


def test_sync_once_cli_reports_blocked_and_errors_are_one_line(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry, cache_dir: Path
) -> None:
    from click.testing import CliRunner

    from lineside.cli import cli

    name = log_versions(registry, SHARED_MODEL)
    registry.set_alias(name, "production", 1)
    path, _ = write_world(
        tmp_path / "w",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=name,
        cache_dir=cache_dir,
    )
    runner = CliRunner()
    result = runner.invoke(cli, ["sync", "once", "--config", str(path), "--settle", "0"])
    assert result.exit_code == 0, result.output
    assert "1 manifest(s) published" in result.output
    result = runner.invoke(cli, ["sync", "once", "--config", str(path), "--settle", "0"])
    assert "0 manifest(s) published" in result.output

    (tmp_path / "w" / "keys" / "release.pem").chmod(0o644)
    result = runner.invoke(cli, ["sync", "once", "--config", str(path)])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "chmod 600" in lines[0] and "Traceback" not in result.output
    json.dumps(lines)


def test_build_retry_error_belongs_to_the_exception_tree() -> None:
    """The service loop and the CLI handle exactly registry_sync.errors' tree: the
    retryable build failure is part of it, documented there with the others."""
    from registry_sync import errors

    assert issubclass(errors.BuildRetryError, errors.SyncError)
    assert not issubclass(errors.BuildRetryError, errors.BuildBlockedError)  # not cached
    assert "BuildRetryError" in errors.__all__
    assert errors.__doc__ is not None
    assert re.search(r"^    ├── BuildRetryError\s+\S", errors.__doc__, flags=re.M)
    exc = errors.BuildRetryError("model not downloadable", retry_at=120.0, attempted=False)
    assert (str(exc), exc.retry_at, exc.attempted) == ("model not downloadable", 120.0, False)
