"""The reconcile loop: converge the broker's retained state to the registry's desired state.

One pass (``SyncService.reconcile``):

1. read the registry (selectors -> desired version per model, ``desired.py``);
2. read back every retained manifest from the broker (never trust local memory alone:
   a broker restarted without persistence has none, and the pass republishes);
3. per model: build the variants every plan group needs (a blocked build stops that
   model before anything is published), advance its staged rollout (``rollout.py``),
   and make each group's retained manifest say what it should — publishing chunks
   first, then the signed manifest; an unchanged deployment is never re-signed. What a
   group should carry: the rollout's version on the groups it reached; on a reverted
   group and on the groups it has not reached, what they carried when the rollout began
   (``Rollout.previous``); for an undeployed model, the undeploy form of what the group
   last had. A manifest the broker lost (restarted without persistence) is republished
   byte for byte from ``streams.json``, with its chunks;
4. clear chunks that no retained manifest references any more;
5. write history (tags, telemetry runs, MLflow writes queued by device messages) and the
   fleet snapshot.

Sequence numbers: ``max(local state, retained manifest) + 1`` per (group, model), so they
keep increasing across restarts and across the loss of the state dir.

Failures: the registry snapshot, the broker and the state dir are shared by every model,
so their errors end the pass with a ``SyncError``; ``run`` logs it, reports it, backs off
and tries again. Anything else is one model's problem: a blocked build (deterministic,
reported once), a conversion that may succeed later (``BuildRetryError``: retried with
backoff on later passes) or an unexpected exception is logged and published as a sync
event, and the other models still converge in the same pass.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import BrokerError
from edge_agent.mqtt import Backoff, LinkOptions, MqttLink
from edge_agent.protocol.ed25519 import PublicKey
from edge_agent.protocol.topics import Topics
from registry_sync import signing
from registry_sync.builder import Builder, Bundle
from registry_sync.config import DeviceClass, ModelSpec, SyncConfig
from registry_sync.desired import Desired, desired_state
from registry_sync.errors import (
    BrokerUnavailableError,
    BuildBlockedError,
    BuildRetryError,
    ManifestSigningError,
    ParityBlockedError,
    StateError,
    SyncError,
)
from registry_sync.fleet import DeviceRecord, FleetMonitor, FleetView, with_offline_after
from registry_sync.history import History, iso
from registry_sync.manifests import (
    VOLATILE,
    chunk_ids,
    content_key,
    deploy_content,
    finalize,
    model_chunks,
    undeploy_content,
)
from registry_sync.publisher import Publisher, RetainedManifest
from registry_sync.registry import RegistryClient
from registry_sync.rollout import (
    COMPLETE,
    HALTED,
    IN_PROGRESS,
    Rollout,
    advance,
    evaluate_gate,
    start_rollout,
)
from registry_sync.state import read_json, write_json_atomic
from registry_sync.webhook import WebhookServer

__all__ = ["PassReport", "Signer", "SyncService", "classes_for_group"]

log = logging.getLogger(__name__)


def classes_for_group(group: str, classes: tuple[DeviceClass, ...]) -> tuple[DeviceClass, ...]:
    """Device classes whose configs list ``group``; all of them for a group no config names
    (plan-only groups such as ``canary`` or ``all``)."""
    named = tuple(c for c in classes if group in c.groups)
    return named or classes


class Signer:
    """The configured signing key(s); extra keys add signatures during a key rotation."""

    def __init__(self, key: Path, extra: tuple[Path, ...] = ()) -> None:
        try:
            self.key = signing.load_private_key(key)
            self.extra = [signing.load_private_key(p) for p in extra]
        except FileNotFoundError as exc:
            raise ManifestSigningError(f"signing key not found: {exc.filename}") from exc
        except signing.SigningError as exc:
            raise ManifestSigningError(str(exc)) from exc

    def trusted(self) -> dict[str, PublicKey]:
        keys = [self.key, *self.extra]
        return {signing.key_id(k): PublicKey(signing.public_key_bytes(k)) for k in keys}

    def sign(self, signed: Mapping[str, Any]) -> bytes:
        try:
            return signing.sign_manifest(signed, self.key, extra_keys=self.extra)
        except Exception as exc:  # SigningError, or the agent's parser refusing the object
            raise ManifestSigningError(
                f"cannot sign the manifest for {signed.get('model')}: {type(exc).__name__}: {exc}"
            ) from exc


@dataclass
class PassReport:
    published: list[dict[str, Any]] = field(default_factory=list)
    cleared_chunks: int = 0
    blocked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # models that failed this pass (retried)
    messages_sent: int = 0

    def summary(self) -> str:
        parts = [
            f"{len(self.published)} manifest(s) published",
            f"{self.cleared_chunks} stale chunk(s) cleared",
        ]
        if self.blocked:
            parts.append(f"{len(self.blocked)} blocked")
        if self.failed:
            parts.append(f"{len(self.failed)} failed (retried)")
        return ", ".join(parts)


class SyncService:
    def __init__(
        self,
        config: SyncConfig,
        *,
        clock: Callable[[], float] = time.time,
        convert: Callable[..., Any] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        # MLflow reads its HTTP retry policy from the environment only; a dead tracking
        # server must fail a pass in seconds (then we back off), not block it for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(config.http_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(config.http_timeout_s)))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        self.topics = Topics(config.topic_root)
        self.signer = Signer(config.signing_key, config.extra_signing_keys)
        self.registry = RegistryClient(config.tracking_uri)
        self.builder = Builder(
            config.build.cache_dir or config.state_dir / "cache",
            config.tracking_uri,
            config.build,
            convert,
            clock=clock,
            retry_initial_s=min(config.poll_interval_s, config.retry_max_s),
            retry_max_s=config.retry_max_s,
        )
        self.history = History(
            self.registry, enabled=config.fleet.history, state=self._path("live.json")
        )
        self.view = FleetView()
        self.view.load(read_json(self._path("fleet.json"), {}))
        self.link: MqttLink | None = None
        self.publisher: Publisher | None = None
        self.monitor: FleetMonitor | None = None
        self.wake = threading.Event()
        self._reported: set[str] = set()
        self._drift_armed: dict[tuple[str, str, str], bool] = {}
        self._lock = threading.Lock()  # one pass at a time

    # ---- connection ------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.config.state_dir / name

    def connect(self, *, wait: bool = True) -> None:
        b = self.config.broker
        options = LinkOptions(
            url=b.url,
            client_id=b.client_id,
            username=b.username,
            password=b.password,
            ca=b.ca,
            cert=b.cert,
            key=b.key,
            backoff_max=min(30.0, self.config.retry_max_s),
            # MqttLink's watchdog starts a second network loop next to a starved (not
            # dead) one after stall_timeout; two loops on one paho client corrupt the
            # stream, so only a loop stuck this long is treated as dead.
            stall_timeout=60.0,
        )
        try:
            self.link = MqttLink(options)
            self.link.start(wait=b.connect_timeout_s if wait else None)
        except BrokerError as exc:
            self.link = None
            raise BrokerUnavailableError(str(exc)) from exc
        self.publisher = Publisher(
            self.link, self.topics, self.signer.trusted(), b.publish_timeout_s
        )
        self.monitor = FleetMonitor(self.link, self.topics, self.view, self.clock)
        self.monitor.listeners.append(self._on_device_message)
        try:
            self.monitor.start()
        except BrokerError as exc:
            raise BrokerUnavailableError(str(exc)) from exc

    def close(self) -> None:
        if self.link is not None:
            self.link.stop(timeout=3.0)
            self.link = None
        self._save_fleet()
        self.history.save()

    def _save_fleet(self) -> None:
        write_json_atomic(
            self._path("fleet.json"), {"saved_at": self.clock(), **self.view.to_json()}
        )

    # ---- the pass ----------------------------------------------------------------------

    def reconcile(self) -> PassReport:
        if self.publisher is None:
            raise BrokerUnavailableError("not connected to the broker")
        with self._lock:
            return self._reconcile(self.publisher)

    def _reconcile(self, publisher: Publisher) -> PassReport:
        report = PassReport()
        sent_before = publisher.sent_messages
        now = self.clock()
        snapshots = self.registry.snapshot(s.name for s in self.config.models)
        desired = desired_state(self.config.models, snapshots)
        retained = publisher.read_manifests()
        streams: dict[str, Any] = read_json(
            self._path("streams.json"), {"streams": {}, "chunks": []}
        )
        rollouts: dict[str, Any] = read_json(self._path("rollouts.json"), {})
        ctx = _Pass(
            self,
            publisher,
            retained=retained,
            streams=streams,
            rollouts=rollouts,
            report=report,
            now=now,
        )
        for spec in self.config.models:
            want = desired[spec.name]
            try:
                ctx.model(spec, want)
            except BuildBlockedError as exc:
                ctx.blocked(spec, want, exc)
            except BuildRetryError as exc:
                ctx.failed(spec, want, exc)
            except (BrokerUnavailableError, StateError):
                raise  # shared by every model: the pass cannot go on
            except Exception as exc:  # one model must not stop the others
                ctx.failed(spec, want, exc)
        ctx.clear_stale_chunks()
        write_json_atomic(self._path("rollouts.json"), rollouts)
        self._write_history(now)
        self._save_fleet()
        report.messages_sent = publisher.sent_messages - sent_before
        log.info("reconcile pass: %s", report.summary())
        return report

    def devices(self, now: float | None = None) -> dict[str, DeviceRecord]:
        """The fleet view with ``[fleet].offline_after_s`` applied (silent devices offline)."""
        return with_offline_after(
            self.view.snapshot(),
            self.clock() if now is None else now,
            self.config.fleet.offline_after_s,
        )

    def _write_history(self, now: float) -> None:
        try:
            self.history.drain()
        except SyncError as exc:
            log.warning("queued MLflow writes not done: %s", exc)
        try:
            live: dict[tuple[str, int], list[str]] = {}
            names = {s.name for s in self.config.models}
            for dev, rec in self.devices(now).items():
                if not rec.online:
                    continue
                for model, info in rec.models.items():
                    version = info.get("version")
                    if model in names and isinstance(version, int):
                        live.setdefault((model, version), []).append(dev)
                        if isinstance(info.get("variant"), str):
                            self.history.note_variant(model, version, dev, info["variant"])
            self.history.live_on(live)
            self.history.flush(now)
            self.history.write_live()  # after flush: the runs it ends exist by now
        except SyncError as exc:  # history is best effort; deployments do not wait for it
            log.warning("deployment history not written: %s", exc)

    # ---- device messages (network thread: memory only, MLflow writes are queued) -----

    def _on_device_message(self, device: str, channel: str, payload: Mapping[str, Any]) -> None:
        if channel == "state":
            self._observe_state(device, payload)
            return
        if channel == "events":
            self._observe_event(device, payload)
            return
        if channel != "telemetry":
            return
        now = self.clock()
        snapshot = self.view.snapshot().get(device)
        for model, raw in (payload.get("models") or {}).items():
            t = snapshot.telemetry.get(model) if snapshot else None
            if t is None or not isinstance(raw, dict):
                continue
            self.history.record_telemetry(model, device, t, raw, now)
            for feature, psi in t.psi.items():
                self._check_drift(
                    device=device, model=model, version=t.version, feature=feature, psi=psi, now=now
                )

    def _observe_state(self, device: str, payload: Mapping[str, Any]) -> None:
        """An online state says which version of each model the device runs (none when
        absent); an offline one says nothing about that."""
        if not payload.get("online"):
            return
        at = _reported_at(payload, self.clock())
        raw = payload.get("models")
        models: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
        for spec in self.config.models:
            info = models.get(spec.name)
            version = info.get("version") if isinstance(info, dict) else None
            if isinstance(version, bool) or not isinstance(version, int):
                version = None
            self.history.observe_live(spec.name, device, version, at)

    def _observe_event(self, device: str, payload: Mapping[str, Any]) -> None:
        """A rollback names the version now serving (``to``; null: none)."""
        model = payload.get("model")
        if payload.get("code") != "rolled_back" or "to" not in payload:
            return
        if model not in {s.name for s in self.config.models}:
            return
        to = payload.get("to")
        version = to if isinstance(to, int) and not isinstance(to, bool) else None
        self.history.observe_live(str(model), device, version, _reported_at(payload, self.clock()))

    def _check_drift(
        self, *, device: str, model: str, version: int | None, feature: str, psi: float, now: float
    ) -> None:
        threshold = self.config.fleet.drift_psi_threshold
        key = (device, model, feature)
        above = psi > threshold
        was_above = self._drift_armed.get(key, False)
        self._drift_armed[key] = above
        if not above or was_above:
            return  # alert once per crossing, re-armed when PSI falls back under
        message = f"PSI of {feature} on {device} is {psi:.3f} (threshold {threshold:g})"
        log.warning("drift: %s", message)
        event = {
            "kind": "drift",
            "code": "psi_above_threshold",
            "model": model,
            "version": version,
            "device": device,
            "feature": feature,
            "psi": psi,
            "message": message,
        }
        if isinstance(version, int):
            # Queued for the pass: an MLflow call here would block the MQTT network thread.
            v: int = version
            tag_key, value = f"lineside.drift.{device}", f"{feature} psi={psi:.3f} at {iso(now)}"
            self.history.defer(
                f"drift tag of {model} v{v}",
                lambda: self.history.tag(model, v, tag_key, value),
            )
        if self.publisher is not None:
            self.publisher.publish_event(event)
        command = self.config.fleet.drift_command
        if command:
            threading.Thread(
                target=self._run_drift_command, args=(list(command), event), daemon=True
            ).start()

    def _run_drift_command(self, command: list[str], event: Mapping[str, Any]) -> None:
        import json

        env_json = json.dumps(event, sort_keys=True)
        args = [
            *command,
            str(event["model"]),
            str(event["device"]),
            str(event["feature"]),
            f"{event['psi']:.6f}",
        ]
        try:
            # An argument list, never a shell; the event also goes to stdin as JSON.
            done = subprocess.run(
                args,
                input=env_json.encode(),
                capture_output=True,
                timeout=self.config.fleet.drift_command_timeout_s,
                check=False,
            )
            if done.returncode != 0:
                log.warning(
                    "drift command exited %s: %s",
                    done.returncode,
                    done.stderr.decode(errors="replace")[:300],
                )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("drift command failed: %s", exc)

    # ---- the service -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Reconcile every poll interval (or at once on a webhook hint) until ``stop``."""
        webhook = None
        if self.config.webhook is not None:
            w = self.config.webhook
            webhook = WebhookServer(w.host, w.port, w.secret, self.wake.set, w.max_skew_s)
            webhook.start()
            log.info("webhook listening on %s:%s", w.host, webhook.port)
        backoff = Backoff(1.0, self.config.retry_max_s)
        try:
            while not stop.is_set():
                delay = self.config.poll_interval_s
                try:
                    if self.link is None:
                        self.connect(wait=False)
                    self.reconcile()
                    backoff.reset()
                except SyncError as exc:
                    delay = backoff.next()
                    log.error(
                        "reconcile failed (%s): %s; retrying in %.1fs",
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                    if self.publisher is not None:
                        self.publisher.publish_event(
                            {"kind": "sync", "code": "pass_failed", "message": str(exc)}
                        )
                except Exception:
                    delay = backoff.next()
                    log.exception("unexpected error in a reconcile pass; retrying in %.1fs", delay)
                self.wake.wait(delay)
                self.wake.clear()
                if stop.is_set():
                    break
        finally:
            if webhook is not None:
                webhook.stop()
            self.close()


class _Pass:
    """The state of one reconcile pass (kept out of SyncService to keep passes independent)."""

    def __init__(
        self,
        svc: SyncService,
        publisher: Publisher,
        *,
        retained: dict[tuple[str, str], RetainedManifest],
        streams: dict[str, Any],
        rollouts: dict[str, Any],
        report: PassReport,
        now: float,
    ) -> None:
        self.svc = svc
        self.cfg = svc.config
        self.publisher = publisher
        self.retained = retained
        self.streams = streams
        self.rollouts = rollouts
        self.report = report
        self.now = now

    # ---- per model -----------------------------------------------------------------

    def model(self, spec: ModelSpec, want: Desired) -> None:
        groups = self.cfg.rollout.groups
        if want.version is None:
            for group in groups:
                self._withdraw(spec, group)
            if spec.name in self.rollouts:
                self.rollouts[spec.name]["status"] = "undeployed"
                self.rollouts[spec.name]["reason"] = want.note
            return
        version = want.version
        # Build for every plan group first: a blocked variant anywhere stops the whole
        # deployment before the first group gets anything.
        bundles = {
            g: self.svc.builder.bundle_for(
                spec.name, version, classes_for_group(g, self.cfg.build.device_classes)
            )
            for g in groups
        }
        rollout = self._rollout(spec, version)
        live = rollout.live_groups()
        for group in live:
            self._deploy(spec, want, group, bundles[group])
        reverted = rollout.status == HALTED and rollout.reverted
        if reverted:
            self._revert(spec, want, rollout)
        for group in rollout.groups:
            if group in live or (reverted and group == rollout.current_group):
                continue
            # Not reached (yet): the group keeps what it had when the rollout began, and
            # gets it back if the broker lost it.
            before = rollout.previous.get(group)
            if before:
                self._restore(spec.name, group, before)
        self.rollouts[spec.name] = rollout.to_json()

    def _last_signed(self, group: str, model: str) -> Mapping[str, Any] | None:
        """What (group, model) carries: the retained manifest if it is ours; if the broker
        has none (it lost its retained state), the last one we published there.

        Ours: verified by one of the current keys, or byte for byte the manifest our
        record says we published (signed by a key since switched away from, operations.md
        section 9): that one is read from the record, so it is re-signed with the current
        keys. Anything else on the broker is not ours and is left alone."""
        r = self.retained.get((group, model))
        wire = self.streams["streams"].get(f"{group}/{model}", {}).get("wire")
        if r is not None:
            if r.signed is not None:
                return r.signed
            if not wire or r.wire != str(wire).encode():
                return None  # not ours (or not what we last published): leave it alone
        if not wire:
            return None
        try:
            signed = json.loads(wire)["signed"]
        except (ValueError, KeyError, TypeError):
            return None
        return signed if isinstance(signed, dict) else None

    def _deployed_versions(self, model: str) -> dict[str, int]:
        out = {}
        for group in self.cfg.rollout.groups:
            signed = self._last_signed(group, model)
            if signed is not None and not signed.get("undeployed"):
                out[group] = int(signed["version"])
        return out

    def _rollout(self, spec: ModelSpec, version: int) -> Rollout:
        doc = self.rollouts.get(spec.name)
        rollout = Rollout.from_json(doc) if doc else None
        settings = self.cfg.rollout
        if (
            rollout is None
            or rollout.version != version
            or rollout.status == "undeployed"
            or rollout.groups != list(settings.groups)
        ):
            deployed = self._deployed_versions(spec.name)
            rollback = bool(deployed) and version < max(deployed.values())
            previous = {}
            for group in settings.groups:
                signed = self._last_signed(group, spec.name)
                if signed is not None:
                    previous[group] = _content(signed)
            rollout = start_rollout(
                settings, spec.name, version, self.now, at_once=rollback, previous=previous
            )
            self._event(
                "rollout",
                "started",
                spec.name,
                version,
                f"{'rollback' if rollback else 'rollout'} of v{version}: "
                f"{rollout.history[-1]['event']}",
            )
            self._tag(
                spec.name,
                version,
                "lineside.rollout",
                f"{rollout.status}: {rollout.history[-1]['event']}",
            )
            return rollout
        if rollout.status == IN_PROGRESS:
            stream = self.streams["streams"].get(f"{rollout.current_group}/{spec.name}", {})
            gate = evaluate_gate(
                settings,
                rollout,
                self.svc.devices(self.now),
                self.now,
                group_sequence=stream.get("sequence"),
            )
            if advance(settings, rollout, gate, self.now):
                code = {HALTED: "halted", COMPLETE: "complete"}.get(rollout.status, "advanced")
                self._event("rollout", code, spec.name, version, rollout.history[-1]["event"])
                self._tag(
                    spec.name,
                    version,
                    "lineside.rollout",
                    f"{rollout.status}: {rollout.history[-1]['event']}",
                )
                if rollout.status == HALTED:
                    log.error("rollout of %s v%s halted: %s", spec.name, version, gate.reason)
        return rollout

    def _revert(self, spec: ModelSpec, want: Desired, rollout: Rollout) -> None:
        group = rollout.current_group
        before = rollout.previous.get(group)
        if before and not before.get("undeployed"):
            self._restore(spec.name, group, before)
            return
        self._withdraw(spec, group)

    def _restore(self, model: str, group: str, content: Mapping[str, Any]) -> None:
        """Make the group carry ``content`` (a deploy or undeploy manifest it had before),
        with its chunks when it has to be published."""
        data: Callable[[], bytes] | None = lambda: self._bytes_for(content)  # noqa: E731
        if content.get("undeployed") and self.retained.get((group, model)) is not None:
            data = None  # the retained manifest it replaces already names these chunks
        self._ensure(model, group, content, data, version=int(content["version"]))

    def _withdraw(self, spec: ModelSpec, group: str) -> None:
        """The undeploy manifest for what the group last had (restored if the broker lost
        it); nothing where nothing of ours was ever deployed."""
        last = self._last_signed(group, spec.name)
        if last is None:
            return
        if last.get("undeployed"):
            content = _content(last)  # already withdrawn: keep it (republish if lost)
        else:
            content = undeploy_content(last, on_undeploy=spec.on_undeploy)
        self._restore(spec.name, group, content)

    def _bytes_for(self, content: Mapping[str, Any]) -> bytes:
        result = self.svc.builder.result(
            str(content["model"]), int(content["version"]), str(content["variant"])
        )
        if result["status"] != "written":
            raise BuildBlockedError(
                f"cannot rebuild {content['model']} v{content['version']} "
                f"{content['variant']} to republish it: {result['reason']}"
            )
        bundle = self.svc.builder.bundle_for(
            str(content["model"]),
            int(content["version"]),
            [DeviceClass("revert", (str(content["variant"]),), (), Path())],
        )
        return bundle.read_model()

    def _deploy(self, spec: ModelSpec, want: Desired, group: str, bundle: Bundle) -> None:
        data = bundle.read_model()
        classes = classes_for_group(group, self.cfg.build.device_classes)
        content = deploy_content(
            bundle,
            data,
            selector=want.selector,
            groups=[group],
            device_classes=[c.name for c in classes],
            chunk_size=self.cfg.build.chunk_size,
        )
        self._ensure(spec.name, group, content, data, version=bundle.version)

    # ---- one stream ----------------------------------------------------------------------

    def _ensure(
        self,
        model: str,
        group: str,
        content: Mapping[str, Any],
        data: bytes | Callable[[], bytes] | None,
        *,
        version: int,
    ) -> None:
        """Make the retained manifest of (group, model) carry ``content``; publish if needed.

        ``data`` is the model file (or a function reading it, called only when publishing):
        its chunks go out before the manifest. None: the chunks are known to be there."""
        key = content_key(content)
        sid = f"{group}/{model}"
        stream: dict[str, Any] = self.streams["streams"].setdefault(sid, {})
        r = self.retained.get((group, model))
        if r is not None:
            stream["sequence"] = max(int(stream.get("sequence", -1)), r.sequence)
        if (
            r is not None
            and r.signed is not None
            and content_key(r.signed) == key
            and self._fresh(r.signed.get("expires_at"))
        ):
            if stream.get("content_key") != key:
                stream.update(content_key=key, wire=r.wire.decode(), version=version)
                self._save_streams()
            return  # the broker already says exactly this: nothing to sign or send
        changed = stream.get("content_key") != key
        republish = (
            r is None
            and not changed
            and bool(stream.get("wire"))
            and self._fresh(stream.get("expires_at"))
        )
        if republish:
            # The broker lost its retained state: republish the very bytes we signed (the
            # devices that accepted them skip them silently), never a re-signed copy.
            wire = str(stream["wire"]).encode()
            sequence = int(stream["sequence"])
        else:
            sequence = int(stream.get("sequence", -1)) + 1
            signed = finalize(
                content,
                sequence=sequence,
                issued_at=int(self.now),
                expires_after_s=self.cfg.build.expires_after_s,
            )
            wire = self.svc.signer.sign(signed)
            stream["expires_at"] = signed["expires_at"]
        if data is not None:
            model_bytes = data() if callable(data) else data
            chunks = model_chunks(model_bytes, self.cfg.build.chunk_size)
            # Into the ledger before sending, so a crash mid-publish still gets cleaned up.
            ledger = set(self.streams["chunks"])
            if not set(chunks) <= ledger:
                self.streams["chunks"] = sorted(ledger | set(chunks))
                self._save_streams()
            self.publisher.publish_chunks(chunks)
        self.publisher.publish_manifest(group, model, wire)
        stream.update(
            sequence=sequence,
            content_key=key,
            wire=wire.decode(),
            version=version,
            variant=content.get("variant"),
            undeployed=bool(content.get("undeployed")),
            published_at=self.now,
        )
        self._save_streams()
        self.retained[(group, model)] = RetainedManifest(
            group,
            model,
            wire,
            sequence,
            finalize(content, sequence=sequence, issued_at=int(self.now), expires_after_s=0),
        )
        undeployed = bool(content.get("undeployed"))
        self.report.published.append(
            {
                "group": group,
                "model": model,
                "version": version,
                "sequence": sequence,
                "undeployed": undeployed,
                "republished": republish,
            }
        )
        what = "undeployed" if undeployed else "deployed"
        self._event(
            "deploy",
            "republished" if republish else what,
            model,
            version,
            f"{model} v{version} {what} on {group} (sequence {sequence}"
            f"{', republished: the broker had lost it' if republish else ''})",
            group=group,
        )
        if undeployed:
            if changed:  # a withdrawal, not a republish or re-sign of one
                self._history(
                    lambda: self.svc.history.undeployed(model, version, group, self.now)
                )
        else:  # keeps the first publish time: a republish, re-sign or revert does not move it
            self._history(lambda: self.svc.history.deployed(model, version, group, self.now))

    def _fresh(self, expires_at: Any) -> bool:
        """An expiring manifest is re-signed (new sequence) once half its lifetime is gone,
        so devices never hold only an expired copy; that is the one re-sign of unchanged
        content."""
        if not isinstance(expires_at, int):
            return True
        return expires_at - self.now > self.cfg.build.expires_after_s / 2

    def _save_streams(self) -> None:
        write_json_atomic(self.svc._path("streams.json"), self.streams)

    def clear_stale_chunks(self) -> None:
        referenced: set[str] = set()
        for r in self.retained.values():
            if r.signed is not None:
                referenced |= chunk_ids(r.signed)
            else:  # not ours or not parseable: keep whatever it might name
                referenced |= _loose_chunk_ids(r.wire)
        ledger = set(self.streams["chunks"])
        stale = sorted(ledger - referenced)
        if not stale:
            return
        self.publisher.clear_chunks(stale)
        self.streams["chunks"] = sorted(ledger & referenced)
        self._save_streams()
        self.report.cleared_chunks += len(stale)

    # ---- reporting -----------------------------------------------------------------------

    def failed(self, spec: ModelSpec, want: Desired, exc: Exception) -> None:
        """A model that could not converge this pass; the next passes try again."""
        version = want.version or 0
        retry = isinstance(exc, BuildRetryError)
        message = str(exc) if retry else f"{type(exc).__name__}: {exc}"
        self.report.failed.append(f"{spec.name}: {message}")
        if isinstance(exc, BuildRetryError):
            if not exc.attempted:  # still backing off: reported when it was attempted
                log.info(
                    "%s v%s waits for its next conversion attempt: %s",
                    spec.name,
                    version,
                    exc,
                )
                return
            log.error("building %s v%s failed, will retry: %s", spec.name, version, exc)
            code = "build_retry"
        else:
            log.error(
                "unexpected error handling %s v%s (the other models go on)",
                spec.name,
                version,
                exc_info=exc,
            )
            code = "model_failed"
        self._event("sync", code, spec.name, want.version, f"{spec.name}: {message}")

    def blocked(self, spec: ModelSpec, want: Desired, exc: BuildBlockedError) -> None:
        self.report.blocked.append(str(exc))
        version = want.version or 0
        key = f"{spec.name}/{version}/{exc}"
        if key in self.svc._reported:
            return
        self.svc._reported.add(key)
        code = "parity_failed" if isinstance(exc, ParityBlockedError) else "build_blocked"
        log.error("deployment of %s v%s blocked: %s", spec.name, version, exc)
        self._event("build", code, spec.name, version, str(exc))
        if version:
            self._tag(spec.name, version, "lineside.blocked", str(exc))
            if isinstance(exc, ParityBlockedError):
                self._tag(spec.name, version, "lineside.parity_failed", str(exc))

    def _event(
        self, kind: str, code: str, model: str, version: int | None, message: str, **extra: Any
    ) -> None:
        self.publisher.publish_event(
            {
                "kind": kind,
                "code": code,
                "model": model,
                "version": version,
                "message": message,
                **extra,
            }
        )

    def _tag(self, model: str, version: int, key: str, value: str) -> None:
        self._history(lambda: self.svc.history.tag(model, version, key, value))

    def _history(self, write: Callable[[], None]) -> None:
        try:
            write()
        except SyncError as exc:
            log.warning("deployment history not written: %s", exc)


def _reported_at(payload: Mapping[str, Any], now: float) -> float:
    """The device's own time of a message (``ts``), never later than its receipt."""
    ts = payload.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and ts > 0:
        return min(float(ts), now)
    return now


def _content(signed: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's content: everything but sequence, issued_at and expires_at."""
    return {k: v for k, v in signed.items() if k not in VOLATILE}


def _loose_chunk_ids(wire: bytes) -> set[str]:
    import re

    try:
        doc = json.loads(wire)
        files = doc["signed"]["files"]
        return {c for f in files for c in f["chunks"] if re.fullmatch(r"[0-9a-f]{64}", c)}
    except (ValueError, KeyError, TypeError):
        return set()
