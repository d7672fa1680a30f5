"""The update state machine: a retained manifest in, a verified model serving out.

One ``Updater`` thread owns the ``ModelStore`` and does all disk writes; paho's network
thread only enqueues (manifests, chunks, commands). One update runs at a time; a
manifest arriving meanwhile waits (the newest per stream wins).

States of the current update (each entry is an ``update`` event and the ``update``
member of the device state)::

    idle ─▶ checking ──refused──────────────────────────────────────────▶ idle
               │ accepted (signature, target, expiry, sequence, size, variant)
               ▼
           downloading ──deadline / bad chunk──────────────────────────▶ idle
               │ every chunk verified and written
               ▼
           verifying (ChunkAssembler.finish: size + sha256 from disk) ──▶ idle
               ▼
           installing (store.install: files into place, no ONNX external data)
               ▼
           loading (load_session) ──ModelLoadFailed──▶ mark bad ───────▶ idle
               ▼
           smoke_test (golden pairs, inputs fit the field mapping) ─▶ mark bad ▶ idle
               ▼
           activating (store.activate: sequence + pointer in one atomic write,
                       then the in-memory swap under the engine's lock) ─▶ idle

After activation the model is *watched*: its ``HealthWindow`` (config ``[health]``)
judges errors, NaN outputs and latency; a failed window rolls back
(``store.rollback``, reload the previous version, swap back, mark the bad one,
event ``rolled_back``). A refused valid-but-bad model has its sequence recorded so the
same retained manifest is not retried; a newer manifest clears the mark. A failed window
with no previous version to go back to keeps the version serving, reported
``rollback_unavailable`` and shown ``degraded`` in ``state`` until a newer manifest
replaces it (serving nothing would turn every sensor message into a ``no_model`` error).

Watchdog: every step of the updater thread (one chunk write, the manifest check, each of
verifying .. activating, the health check) runs against ``limits.step_deadline_s``. A
Python thread cannot be killed, so a step past it is *abandoned*, not stopped: the
``updater-watchdog`` thread reports ``update_stalled`` (state, elapsed time) and persists
the manifest in ``stalled.json``; inference keeps serving the old model on its own
thread. If the stuck call returns, its result is dropped (never activated) and the version
is marked bad with its sequence recorded (not retried until a newer manifest). Past
``STALL_RESTART_FACTOR`` times the deadline ``healthy()`` turns false: ``Agent.run``
stops pinging systemd's watchdog and exits for a restart, and the next start applies
``stalled.json`` before anything loads (old version serving, the stalled one reported
``update_stalled`` with ``restarted: true``).

Undeploy (registry_sync's signed form: ``"undeployed": true`` and
``"on_undeploy": "keep" | "stop"`` as extra signed fields of a normal manifest): after
the usual trust checks the sequence is recorded, the model is reported with
``desired: false`` in ``state`` and kept serving unless ``on_undeploy`` is ``stop``.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import importlib.util
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from edge_agent.config import AgentConfig, ModelConfig
from edge_agent.errors import AgentError, UpdateRejected
from edge_agent.fsio import FileSystem
from edge_agent.health import HealthWindow
from edge_agent.inference import InferenceEngine, LoadedModel, load_model
from edge_agent.mqtt import Message
from edge_agent.protocol.chunks import ChunkAssembler, hash_file
from edge_agent.protocol.ed25519 import PublicKey
from edge_agent.protocol.manifest import Limits as ManifestLimits
from edge_agent.protocol.manifest import Manifest, decode_envelope
from edge_agent.protocol.topics import TopicError, Topics
from edge_agent.smoke import check_golden, check_inputs_fit
from edge_agent.store import ActiveModel, ModelStore, StoreError, describe_state
from edge_agent.update.trust import Accepted, Device, Policy, check_manifest
from edge_agent.update_errors import (
    DownloadTimeout,
    DuplicateChunk,
    UnexpectedChunk,
    UpdateStalled,
    WrongTarget,
)

__all__ = ["STALL_RESTART_FACTOR", "TRANSITIONS", "State", "Updater", "runtime_installed"]

log = logging.getLogger(__name__)

Emit = Callable[..., None]  # emit(kind, code, message, **context)
_V = TypeVar("_V")


class State(enum.Enum):
    IDLE = "idle"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    LOADING = "loading"
    SMOKE_TEST = "smoke_test"
    ACTIVATING = "activating"


TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.IDLE: frozenset({State.CHECKING}),
    State.CHECKING: frozenset({State.IDLE, State.DOWNLOADING, State.VERIFYING}),
    State.DOWNLOADING: frozenset({State.IDLE, State.VERIFYING}),
    State.VERIFYING: frozenset({State.IDLE, State.INSTALLING}),
    State.INSTALLING: frozenset({State.IDLE, State.LOADING}),
    State.LOADING: frozenset({State.IDLE, State.SMOKE_TEST}),
    State.SMOKE_TEST: frozenset({State.IDLE, State.ACTIVATING}),
    State.ACTIVATING: frozenset({State.IDLE}),
}

MAX_UNCONFIRMED_STARTS = 3  # starts a new version gets to pass its health window
STALL_RESTART_FACTOR = 2.0  # a step stuck this many step deadlines: unhealthy, restart
MAX_STALLED_DIGESTS = 16  # unverified manifests (stalled while checking) remembered


class _AbandonedStepError(Exception):
    """The watchdog abandoned the current step; raised on the updater thread when the
    stuck call returns, so its result is dropped."""


_RUNTIME_MODULES = {"onnxruntime": ("onnxruntime",), "tflite": ("ai_edge_litert", "tflite_runtime")}


def runtime_installed(runtime: str) -> bool:
    """Whether a runtime's package is importable (checked without importing it)."""
    return any(importlib.util.find_spec(m) is not None for m in _RUNTIME_MODULES.get(runtime, ()))


class Link(Protocol):
    """What the updater needs from ``MqttLink``."""

    def subscribe(
        self, topic_filter: str, handler: Callable[[Message], None], qos: int = 1
    ) -> None: ...

    def unsubscribe(self, topic_filter: str) -> None: ...


@dataclass
class _Job:
    """The update in progress."""

    accepted: Accepted
    raw: bytes
    digest: str
    deadline: float  # monotonic
    assemblers: list[ChunkAssembler] = field(default_factory=list)
    by_chunk: dict[str, list[ChunkAssembler]] = field(default_factory=dict)

    @property
    def manifest(self) -> Manifest:
        return self.accepted.manifest

    def missing(self) -> set[str]:
        return {cid for a in self.assemblers for cid in a.missing}


class Updater:
    """Owns the store; runs updates, health watches, rollbacks and commands."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        store: ModelStore,
        fs: FileSystem,
        keys: Mapping[str, PublicKey],
        engine: InferenceEngine,
        topics: Topics,
        emit: Emit,
        on_state_change: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self._fs = fs
        self._keys = keys
        self._engine = engine
        self._topics = topics
        self._emit = emit
        self._on_state_change = on_state_change
        self._clock = clock
        self._device = Device(config.device_id, frozenset(config.groups), config.device_class)
        self._policy = Policy(
            max_model_bytes=config.limits.max_model_bytes, limits=ManifestLimits()
        )
        self._models = {m.name: m for m in config.models}
        self._link: Link | None = None
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._pending: dict[tuple[str, str], bytes] = {}  # newest manifest per stream
        self._settled: set[str] = set()  # digests already handled: skip re-sends silently
        self._job: _Job | None = None
        self._watching: dict[str, LoadedModel] = {}
        self._undeployed = _UndeployedFile(config.state_dir / "undeployed.json", fs)
        self._starts: _ShaMap[int] = _ShaMap(config.state_dir / "unconfirmed.json", fs, int)
        self._degraded: _ShaMap[str] = _ShaMap(config.state_dir / "degraded.json", fs, str)
        self._stalled_file = _StalledFile(config.state_dir / "stalled.json", fs)
        # Watchdog state, shared with the updater-watchdog thread under _wd_lock.
        self._wd_lock = threading.Lock()
        self._busy: tuple[str, float] | None = None  # (step, monotonic start) running now
        self._stalled: dict[str, Any] | None = None  # the step the watchdog abandoned
        self._checking: tuple[str, str, str] | None = None  # (digest, group, model)
        self.state = State.IDLE
        self.history: list[tuple[State, State]] = []
        self.snapshot: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog_thread: threading.Thread | None = None
        self._refresh_snapshot()

    # ---- start-up: serve from disk before any network -----------------------------

    def load_active(self) -> list[str]:
        """Load every configured model's active version from the store; returns the
        names now serving. A version that no longer loads is rolled back past."""
        serving = []
        self._recover_stalled()
        for name, model_config in self._models.items():
            if self._undeployed.stops(name):
                continue
            unconfirmed = self._count_start(name)
            loaded = self._load_with_fallback(name, model_config)
            if loaded is not None:
                if unconfirmed is not None and loaded.sha256 == unconfirmed:
                    self._watch(loaded)  # its health window starts again
                self._engine.install(loaded)
                serving.append(name)
        self._refresh_snapshot()
        return serving

    def _count_start(self, name: str) -> str | None:
        """Count a start of a version that has not passed its health window yet; past
        ``MAX_UNCONFIRMED_STARTS`` (it keeps killing the process) roll it back. Returns the
        sha256 still unconfirmed, if any."""
        pending = self._starts.get(name)
        active = self.store.active(name)
        if pending is None or active is None or pending[0] != active.sha256:
            if pending is not None:
                self._starts.clear(name)
            return None
        starts = pending[1] + 1
        if starts <= MAX_UNCONFIRMED_STARTS:
            self._starts.set(name, active.sha256, starts)  # persisted before loading it
            return active.sha256
        bad = active.manifest
        self.store.rollback(name, mark_bad=True)
        self._starts.clear(name)
        self._settled.add(bad.digest)
        reason = f"did not pass its health window in {MAX_UNCONFIRMED_STARTS} starts"
        self._event("rolled_back", f"{name}: {reason}", bad, reason=reason, starts=starts - 1)
        return None

    def _recover_stalled(self) -> None:
        """At start: a step that stalled before the restart (the process was restarted
        while a call was stuck, or the call returned after the marker was written):
        its version is rejected before anything loads, and reported."""
        entries = self._stalled_file.entries()
        if not entries:
            return
        done = []
        for digest, entry in entries.items():
            self._settled.add(digest)
            if entry.get("reported"):
                continue
            context = {k: entry.get(k) for k in ("model", "version", "sequence", "sha256")}
            try:
                rolled_back = self._reject_stalled(entry) if entry.get("sha256") else False
            except (OSError, AgentError, KeyError, ValueError, TypeError) as exc:
                log.error("cannot record the stalled update %s as rejected: %s", digest, exc)
                continue  # skipped in memory; stalled.json keeps it for the next start
            done.append(digest)
            self._emit(
                "update",
                UpdateStalled.code,
                f"{entry.get('model')} version {entry.get('version')} was abandoned after "
                f"stalling in {entry.get('step')} before the restart; not retried until a "
                "newer manifest",
                **context,
                group=entry.get("group"),
                state=self.state.value,
                step=entry.get("step"),
                restarted=True,
                rolled_back=rolled_back,
            )
        with contextlib.suppress(OSError):
            self._stalled_file.settle(*done)

    def _reject_stalled(self, entry: Mapping[str, Any]) -> bool:
        """Treat a stalled (trusted, accepted) manifest like a refused bad model: marked
        bad, its sequence recorded; rolled back if its activation had been written.
        Returns whether the store was rolled back."""
        model, sha, group = str(entry["model"]), str(entry["sha256"]), str(entry["group"])
        sequence, issued_at = int(entry["sequence"]), int(entry["issued_at"])
        active = self.store.active(model)
        rolled_back = active is not None and active.sha256 == sha
        if rolled_back:
            self.store.rollback(model, mark_bad=True)
            self._starts.clear(model)
        else:
            self.store.mark_bad(sha, issued_at)
        accepted = self.store.accepted_sequence(group, model)
        if accepted is None or accepted < sequence:
            self.store.record_sequence(group, model, sequence, issued_at)
        return rolled_back

    def _watch(self, loaded: LoadedModel) -> None:
        h = self.config.health
        loaded.health = HealthWindow(
            time.monotonic(), h.window_s, h.max_error_rate, h.latency_budget_ms
        )
        self._watching[loaded.name] = loaded

    def _load_with_fallback(self, name: str, model_config: ModelConfig) -> LoadedModel | None:
        active = self.store.active(name)
        while active is not None:
            try:
                return self._load(active, model_config)
            except UpdateRejected as exc:
                log.error(
                    "model %s %s does not load (%s); rolling back", name, active.sha256[:12], exc
                )
                active = self.store.rollback(name, mark_bad=True)
        return None

    def _load(self, active: ActiveModel, model_config: ModelConfig) -> LoadedModel:
        loaded = load_model(active, model_config, threads=self.config.runtime_threads)
        check_inputs_fit(loaded.session, active.manifest, model_config.fields)
        return loaded

    # ---- threads ------------------------------------------------------------------

    def attach(self, link: Link) -> None:
        """Subscribe to this device's manifests and commands (renewed on reconnect)."""
        self._link = link
        for group in self.config.groups:
            link.subscribe(self._topics.manifests_filter(group), self._on_manifest_message)
        link.subscribe(self._topics.cmd(self.config.device_id), self._on_cmd_message)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()
        self._watchdog_thread = threading.Thread(
            target=self._watchdog_loop, name="updater-watchdog", daemon=True
        )
        self._watchdog_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._watchdog_thread is not None:
            self._watchdog_thread.join(timeout)
        # A clean stop is not a crash: only starts that follow an unclean end count
        # towards MAX_UNCONFIRMED_STARTS (the health window still runs again next start).
        # A stop with a step stuck is not clean.
        if self._stalled is None and self._busy is None:
            with contextlib.suppress(Exception):
                for model, (sha, starts) in self._starts.items():
                    if starts:
                        self._starts.set(model, sha, 0)

    # ---- watchdog (a thread of its own; see the module docstring) ------------------

    def _watchdog_loop(self) -> None:
        period = min(1.0, self.config.limits.step_deadline_s / 4)
        while not self._stop.wait(period):
            try:
                self.check_watchdog()
            except Exception:  # the watchdog must outlive its own failures
                log.exception("updater watchdog failed")

    def check_watchdog(self, now: float | None = None) -> dict[str, Any] | None:
        """Abandon the running step if it has run past ``limits.step_deadline_s``:
        persist the marker, report ``update_stalled``. Returns the stall when it is newly
        flagged. ``now`` is ``time.monotonic()`` (tests move it)."""
        now = time.monotonic() if now is None else now
        deadline = self.config.limits.step_deadline_s
        with self._wd_lock:
            busy = self._busy
            if busy is None or self._stalled is not None or now - busy[1] <= deadline:
                return None
            step, since = busy
            job = self._job
            stall: dict[str, Any] = {"step": step, "elapsed_s": round(now - since, 3)}
            entry: dict[str, Any] | None = None
            if job is not None:
                m = job.manifest
                stall["digest"] = job.digest
                entry = {
                    "step": step,
                    "model": m.model,
                    "group": job.accepted.group,
                    "version": m.version,
                    "sequence": m.sequence,
                    "issued_at": m.issued_at,
                    "sha256": m.model_sha256,
                }
            elif step == State.CHECKING.value and self._checking is not None:
                # Not verified yet: nothing goes into the trusted state, only its digest
                # is remembered (skipped, not retried).
                digest, group, model = self._checking
                stall["digest"] = digest
                entry = {"step": step, "model": model, "group": group}
            stall["entry"] = entry
            self._stalled = stall
            persisted = False
            if entry is not None:
                try:  # under the lock: the updater thread settles it only after this
                    self._stalled_file.add(stall["digest"], entry)
                    persisted = True
                except OSError as exc:
                    log.error("cannot persist the stalled update: %s", exc)
        log.error("updater step %s stalled for %.1fs; abandoned", step, now - since)
        text = f"updater stuck in {step} for {now - since:.1f}s (step deadline {deadline:g}s); " + (
            "the update is abandoned, the serving model is unchanged"
            if entry
            else "the step is abandoned"
        )
        with contextlib.suppress(Exception):
            self._event(
                UpdateStalled.code,
                text,
                job.manifest if job is not None else None,
                job.accepted.group if job is not None else None,
                step=step,
                elapsed_s=stall["elapsed_s"],
                deadline_s=deadline,
                persisted=persisted,
            )
            self._on_state_change()
        return stall

    def healthy(self, now: float | None = None) -> bool:
        """False once a step has been stuck for ``STALL_RESTART_FACTOR`` step deadlines:
        the process must be restarted (``Agent.run`` exits, systemd restarts it). Reads
        memory only, never blocks."""
        busy = self._busy
        if busy is None:
            return True
        now = time.monotonic() if now is None else now
        return now - busy[1] <= self.config.limits.step_deadline_s * STALL_RESTART_FACTOR

    def _busy_enter(self, step: str) -> None:
        """A new step starts (its deadline clock restarts); abandoned if flagged."""
        with self._wd_lock:
            if self._stalled is not None:
                raise _AbandonedStepError(self._stalled["step"])
            self._busy = (step, time.monotonic())

    def _checkpoint(self) -> None:
        with self._wd_lock:
            if self._stalled is not None:
                raise _AbandonedStepError(self._stalled["step"])

    def _busy_end(self) -> None:
        with self._wd_lock:
            if self._stalled is not None:
                raise _AbandonedStepError(self._stalled["step"])
            self._busy = None

    def _abandon_stalled(self) -> None:
        """The stuck call returned (or raised): drop its result, reject its version."""
        with self._wd_lock:
            stall, self._stalled = self._stalled, None
            self._busy = None
            self._checking = None
        if stall is None:
            return
        log.warning("the stalled %s step returned; its result is dropped", stall["step"])
        digest, entry = stall.get("digest"), stall.get("entry")
        if digest:
            self._settled.add(digest)
        if entry is not None and digest:
            try:
                if entry.get("sha256"):
                    self._reject_stalled(entry)
                    self.store.discard(str(entry["sha256"]))
                with self._wd_lock:
                    self._stalled_file.settle(digest)
            except (OSError, AgentError) as exc:  # stalled.json still says it: next start
                log.error("cannot record the stalled update as rejected: %s", exc)
        self._abandon()
        with contextlib.suppress(Exception):
            self._refresh_snapshot()
            self._on_state_change()

    def status(self) -> dict[str, Any]:
        job = self._job
        out: dict[str, Any] = {"state": self.state.value, "watching": sorted(self._watching)}
        stall = self._stalled
        if stall is not None:
            out["stalled"] = {"step": stall["step"], "elapsed_s": stall["elapsed_s"]}
        if job is not None:
            out |= {
                "model": job.manifest.model,
                "version": job.manifest.version,
                "sequence": job.manifest.sequence,
                "missing_chunks": len(job.missing()),
            }
        return out

    # network thread: enqueue only
    def _on_manifest_message(self, message: Message) -> None:
        self._queue.put(("manifest", message))

    def _on_chunk_message(self, message: Message) -> None:
        self._queue.put(("chunk", message))

    def _on_cmd_message(self, message: Message) -> None:
        self._queue.put(("cmd", message))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kind, item = self._queue.get(timeout=0.1)
            except queue.Empty:
                kind, item = "tick", None
            self.step(kind, item)

    def step(self, kind: str, item: Any) -> None:
        """Handle one queue item (``manifest``, ``chunk``, ``cmd`` or ``tick``) then tick.

        An unexpected error ends the current update, reported, never the updater thread."""
        try:
            self._busy_enter(self.state.value)
            self._dispatch(kind, item)
            self._busy_enter(self.state.value)
            self._tick()
            self._busy_end()
        except _AbandonedStepError:
            self._abandon_stalled()
        except Exception as exc:  # one bad message must not end updates for good
            if self._stalled is not None:  # the stuck call ended in an error: same thing
                self._abandon_stalled()
                return
            log.exception("updater step %s failed", kind)
            self._unexpected(exc)

    def _unexpected(self, exc: Exception) -> None:
        job = self._job
        if job is not None or self.state is not State.IDLE or isinstance(exc, OSError):
            if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
                code, text = "unsafe_model", f"a symlink was planted in the model store: {exc}"
            elif isinstance(exc, OSError):
                code, text = "store_error", f"model store I/O failed: {exc}"
            else:
                code, text = "internal_error", f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                if job is None:  # failed while checking a manifest
                    self._event(code, text)
                else:
                    self._event(code, text, job.manifest, job.accepted.group)
        self._abandon()
        with self._wd_lock:
            self._busy = None
            self._checking = None
        with contextlib.suppress(Exception):
            self._refresh_snapshot()
            self._on_state_change()

    def _dispatch(self, kind: str, item: Any) -> None:
        if kind == "manifest":
            self._on_manifest(item)
        elif kind == "chunk":
            self._on_chunk(item)
        elif kind == "cmd":
            self._on_cmd(item)

    def _tick(self) -> None:
        job = self._job
        if job is not None and time.monotonic() > job.deadline:
            missing = len(job.missing())
            deadline_s = self.config.limits.update_deadline_s
            self._fail(DownloadTimeout(f"{missing} chunk(s) still missing after {deadline_s:g}s"))
        self._check_health()
        if self._job is None and self._pending:
            (group, model), raw = next(iter(self._pending.items()))
            del self._pending[(group, model)]
            self._start_update(group, model, raw)

    # ---- state ----------------------------------------------------------------------

    def _enter(self, state: State) -> None:
        if state is State.IDLE:
            self._checkpoint()
        else:
            self._busy_enter(state.value)
        if state not in TRANSITIONS[self.state]:
            raise AgentError(f"update state {self.state.value} -> {state.value} is not allowed")
        self.history.append((self.state, state))
        del self.history[:-64]
        self.state = state

    def _refresh_snapshot(self) -> None:
        models = describe_state(self.store)
        for name, entry in models.items():
            entry["desired"] = not self._undeployed.has(name)
            entry["serving"] = self._engine.current(name) is not None
            degraded = self._degraded.get(name)
            if degraded is not None and degraded[0] == entry.get("sha256"):
                entry["degraded"] = degraded[1]
        self.snapshot = models

    def _event(
        self,
        code: str,
        message: str,
        manifest: Manifest | None = None,
        group: str | None = None,
        kind: str = "update",
        **extra: Any,
    ) -> None:
        context: dict[str, Any] = dict(extra)
        if manifest is not None:
            context |= {
                "model": manifest.model,
                "version": manifest.version,
                "sequence": manifest.sequence,
                "sha256": manifest.model_sha256,
            }
        if group is not None:
            context["group"] = group
        context["state"] = self.state.value
        self._emit(kind, code, message, **context)

    # ---- manifests ------------------------------------------------------------------

    def _on_manifest(self, message: Message) -> None:
        try:
            parsed = self._topics.parse(message.topic)
        except TopicError:
            return
        group, model = parsed.group, parsed.model
        if group is None or model is None or model not in self._models:
            return  # another model of the group: not ours to run
        if not message.payload:
            return  # a cleared retained topic; undeploy is a signed manifest, not this
        digest = _digest(message.payload)
        active = self.store.active(model)
        if digest is not None and (
            digest in self._settled or (active is not None and active.manifest.digest == digest)
        ):
            return  # the broker re-sends retained manifests on every (re)subscribe
        job = self._job
        if job is not None:
            if job.digest != digest:
                self._pending[(group, model)] = message.payload
            return
        self._start_update(group, model, message.payload)

    def _start_update(self, group: str, model: str, raw: bytes) -> None:
        digest = _digest(raw) or ""
        self._checking = (digest, group, model)
        self._enter(State.CHECKING)
        try:
            accepted = check_manifest(
                raw,
                group=group,
                model=model,
                state=self.store.trusted_state(self._keys),
                device=self._device,
                now=self._clock(),
                policy=self._policy,
            )
            self._check_variant(accepted.manifest)
            self._checkpoint()
        except UpdateRejected as exc:
            self._checkpoint()
            self._settled.add(digest)
            self._event(exc.code, str(exc), group=group, model=model)
            self._enter(State.IDLE)
            return
        manifest = accepted.manifest
        if manifest.extra.get("undeployed") is True:
            self._checking = None
            self._undeploy(accepted, digest)
            return
        self._event("accepted", f"{model} version {manifest.version} accepted", manifest, group)
        job = _Job(
            accepted, raw, digest, deadline=time.monotonic() + self.config.limits.update_deadline_s
        )
        with self._wd_lock:  # a stall from here on abandons the job (it has a sequence)
            self._job = job
            self._checking = None
        self._begin_download(job)

    def _check_variant(self, manifest: Manifest) -> None:
        if manifest.variant not in self.config.variants:
            raise WrongTarget(
                f"variant {manifest.variant!r} is not in this device's "
                f"runtime.variants {list(self.config.variants)}"
            )
        if not runtime_installed(manifest.runtime):
            raise WrongTarget(f"runtime {manifest.runtime!r} is not installed on this device")

    def _begin_download(self, job: _Job) -> None:
        manifest = job.manifest
        for entry in manifest.files:
            final = self.store.models_dir / manifest.model_sha256 / entry.path
            if final.is_file() and hash_file(final) == (entry.size, entry.sha256):
                continue  # already installed (same model, new metadata)
            assembler = ChunkAssembler(entry, self.store.partial_path(manifest, entry), self._fs)
            job.assemblers.append(assembler)
            for cid in entry.chunks:
                job.by_chunk.setdefault(cid, []).append(assembler)
        if not job.by_chunk:
            self._enter(State.VERIFYING)
            self._complete(job)
            return
        self._enter(State.DOWNLOADING)
        self._refresh_snapshot()
        self._on_state_change()
        if self._link is not None:
            for cid in sorted(job.by_chunk):
                self._link.subscribe(self._topics.chunk(cid), self._on_chunk_message)

    # ---- chunks ---------------------------------------------------------------------

    def _on_chunk(self, message: Message) -> None:
        job = self._job
        try:
            cid = self._topics.parse(message.topic).sha256
        except TopicError:
            return
        if job is None or cid is None or cid not in job.by_chunk:
            return  # a late re-send for a finished or abandoned download
        try:
            for assembler in job.by_chunk[cid]:
                with contextlib.suppress(DuplicateChunk):
                    assembler.add(message.payload, announced=cid)
        except UpdateRejected as exc:
            if isinstance(exc, UnexpectedChunk) and not isinstance(exc, DuplicateChunk):
                return  # cannot happen for a subscribed id; ignore rather than abort
            self._fail(exc)
            return
        if self._link is not None:
            self._link.unsubscribe(self._topics.chunk(cid))
        if all(a.complete for a in job.assemblers):
            self._enter(State.VERIFYING)
            self._complete(job)

    # ---- verify, install, load, smoke test, activate --------------------------------

    def _complete(self, job: _Job) -> None:
        manifest = job.manifest
        group = job.accepted.group
        try:
            for assembler in job.assemblers:
                assembler.finish()
            self._enter(State.INSTALLING)
            self.store.install(job.raw, manifest)
        except (UpdateRejected, StoreError) as exc:
            self._checkpoint()
            self._fail(exc)
            return
        self._checkpoint()
        self._event(
            "installed", f"{manifest.model} version {manifest.version} installed", manifest, group
        )
        model_config = self._models[manifest.model]
        active = ActiveModel(
            manifest.model_sha256, self.store.models_dir / manifest.model_sha256, manifest
        )
        try:
            self._enter(State.LOADING)
            loaded = load_model(active, model_config, threads=self.config.runtime_threads)
            self._enter(State.SMOKE_TEST)
            check_golden(loaded.session, manifest)
            check_inputs_fit(loaded.session, manifest, model_config.fields)
        except UpdateRejected as exc:
            self._checkpoint()
            # A valid but bad model: never retried until a newer manifest names it.
            self.store.mark_bad(manifest.model_sha256, manifest.issued_at)
            self.store.record_sequence(group, manifest.model, manifest.sequence, manifest.issued_at)
            self._fail(exc, settle=True)
            return
        self._enter(State.ACTIVATING)
        self._activate(job, loaded)

    def _activate(self, job: _Job, loaded: LoadedModel) -> None:
        manifest = job.manifest
        self.store.activate(job.accepted)  # persisted first: sequence + pointer, atomic
        with contextlib.suppress(OSError):  # crash-loop protection only; never block the swap
            self._starts.set(manifest.model, manifest.model_sha256, 0)
        self._undeployed.clear(manifest.model)
        self._degraded.clear(manifest.model)
        with self._wd_lock:  # the commit point: abandoned before it, committed after it
            if self._stalled is not None:
                raise _AbandonedStepError(self._stalled["step"])  # the store is rolled back
            self._job = None
            self._busy = ("activated", time.monotonic())
        self._watch(loaded)
        self._engine.install(loaded)  # then the in-memory swap, under the engine's lock
        self._settled.add(job.digest)
        self._event(
            "activated",
            f"{manifest.model} version {manifest.version} is serving",
            manifest,
            job.accepted.group,
        )
        self._enter(State.IDLE)
        self._refresh_snapshot()
        self._on_state_change()

    def _fail(self, exc: AgentError, *, settle: bool = False) -> None:
        job = self._job
        if job is None:
            return
        code = getattr(exc, "code", "store_error")
        self._event(code, str(exc), job.manifest, job.accepted.group)
        if settle:
            self._settled.add(job.digest)
        self._abandon()
        self._refresh_snapshot()
        self._on_state_change()

    def _abandon(self) -> None:
        """Drop the job: unsubscribe its chunks, delete its partial files."""
        job, self._job = self._job, None
        if job is not None:
            if self._link is not None:
                for cid in job.missing():
                    self._link.unsubscribe(self._topics.chunk(cid))
            for assembler in job.assemblers:
                if assembler.partial.exists():
                    with contextlib.suppress(OSError):
                        self._fs.unlink(assembler.partial)
            # The directory partial_path made for an install that will not finish (the
            # store removes it at the next open; a long-running agent must not collect one
            # per refused update).
            sha = job.manifest.model_sha256
            model_dir = self.store.models_dir / sha
            if (model_dir.is_dir() or model_dir.is_symlink()) and not self.store.is_installed(sha):
                with contextlib.suppress(OSError):
                    self._fs.rmtree(model_dir)
        if self.state is not State.IDLE:
            self.history.append((self.state, State.IDLE))
            self.state = State.IDLE

    # ---- health windows and rollback ------------------------------------------------

    def _check_health(self) -> None:
        now = time.monotonic()
        for name, loaded in list(self._watching.items()):
            if loaded.health is None:
                del self._watching[name]
                continue
            self._busy_enter("watched")
            with loaded.health_lock:
                verdict, reason = loaded.health.verdict(now)
            self._checkpoint()
            if verdict == "healthy":
                loaded.health = None
                del self._watching[name]
                self._starts.clear(name)
                self._event(
                    "healthy", f"{name} passed its health window", loaded.manifest, kind="health"
                )
            elif verdict == "failed":
                del self._watching[name]
                if self.store.has_previous(name):
                    self._rollback(name, reason or "health window failed")
                else:
                    self._degrade(loaded, reason or "health window failed")

    def _degrade(self, loaded: LoadedModel, reason: str) -> None:
        """A failed health window with nothing to roll back to (the first version ever
        installed): serving it beats serving nothing. It stays active, is no longer
        counted as unconfirmed, shows ``degraded`` in ``state`` and is replaced by the
        next newer manifest like any version."""
        name = loaded.name
        self._starts.clear(name)
        self._degraded.set(name, loaded.sha256, reason)
        self._event(
            "rollback_unavailable",
            f"{name}: {reason}; no previous version to roll back to, version "
            f"{loaded.manifest.version} keeps serving (degraded) until a newer manifest",
            loaded.manifest,
            reason=reason,
            degraded=True,
        )
        self._refresh_snapshot()
        self._on_state_change()

    def _rollback(self, name: str, reason: str) -> LoadedModel | None:
        """Back to the previous intact version; the abandoned one is marked bad."""
        current = self._engine.current(name)
        bad = current.manifest if current is not None else None
        previous = self.store.rollback(name, mark_bad=True)
        loaded = None
        while previous is not None:
            try:
                loaded = self._load(previous, self._models[name])
                break
            except UpdateRejected:
                previous = self.store.rollback(name, mark_bad=True)
        if loaded is not None:
            self._engine.install(loaded)
        else:
            self._engine.remove(name)
        self._watching.pop(name, None)
        self._starts.clear(name)
        self._degraded.clear(name)
        if bad is not None:
            self._settled.add(bad.digest)
        to = loaded.describe() if loaded is not None else None
        self._event("rolled_back", f"{name}: {reason}", bad, to=to, reason=reason)
        self._refresh_snapshot()
        self._on_state_change()
        return loaded

    # ---- undeploy -------------------------------------------------------------------

    def _undeploy(self, accepted: Accepted, digest: str) -> None:
        manifest = accepted.manifest
        self.store.record_sequence(
            accepted.group, manifest.model, manifest.sequence, manifest.issued_at
        )
        stop = manifest.extra.get("on_undeploy") == "stop"
        self._undeployed.set(manifest.model, stop=stop)
        if stop:
            self._engine.remove(manifest.model)
        self._settled.add(digest)
        self._event(
            "undeployed",
            f"{manifest.model} is no longer desired"
            + ("; stopped" if stop else "; the last version keeps serving"),
            manifest,
            accepted.group,
            on_undeploy="stop" if stop else "keep",
        )
        self._enter(State.IDLE)
        self._refresh_snapshot()
        self._on_state_change()

    # ---- commands (docs/protocol.md section 8.5) -----------------------------------

    def _on_cmd(self, message: Message) -> None:
        try:
            body = json.loads(message.payload)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            self._emit("cmd", "malformed", "command is not a JSON object")
            return
        cmd_id, cmd, model = body.get("id"), body.get("cmd"), body.get("model")
        code, text = self._command(cmd, model)
        self._emit("cmd", code, text, id=cmd_id, cmd=cmd, model=model)

    def _command(self, cmd: Any, model: Any) -> tuple[str, str]:
        if cmd == "report":
            self._refresh_snapshot()
            self._on_state_change()
            return "ok", "state published"
        if cmd == "resync":
            self._settled.clear()
            if self._link is not None:
                for group in self.config.groups:  # a new SUBSCRIBE re-sends retained ones
                    self._link.subscribe(
                        self._topics.manifests_filter(group), self._on_manifest_message
                    )
            return "ok", "retained manifests requested again"
        if cmd == "rollback":
            return self._cmd_rollback(model)
        return "unknown_cmd", f"unknown command {cmd!r}"

    def _cmd_rollback(self, model: Any) -> tuple[str, str]:
        if model not in self._models:
            return "unknown_model", f"model {model!r} is not configured on this device"
        if not self.store.history(str(model)):
            return "no_previous", f"{model} has no previous intact version"
        loaded = self._rollback(str(model), "rollback command")
        if loaded is None:
            return "no_previous", f"{model} has no previous version that loads"
        return "ok", f"{model} rolled back to version {loaded.manifest.version}"


def _digest(raw: bytes) -> str | None:
    try:
        return decode_envelope(raw).digest
    except UpdateRejected:
        return None


class _ShaMap(Generic[_V]):
    """model -> [sha256, value], one small JSON file written with ``atomic_write``.

    ``unconfirmed.json`` (value: starts) holds an activated version not yet through its
    health window: written at activation (starts 0), incremented before each later start
    loads it, cleared when the window passes or the model is rolled back, so a version
    that kills the process every time it runs is rolled back after
    ``MAX_UNCONFIRMED_STARTS`` starts, like a boot counter in an A/B updater (RAUC,
    Mender). ``degraded.json`` (value: the reason) holds a version that failed its health
    window with nothing to roll back to. A file that does not parse counts as empty: both
    only ever make the agent more careful, never trust more."""

    def __init__(self, path: Path, fs: FileSystem, value: Callable[[Any], _V]) -> None:
        self.path = path
        self._fs = fs
        try:
            raw = json.loads(path.read_bytes()) if path.exists() else {}
            self._models = {str(k): (str(v[0]), value(v[1])) for k, v in dict(raw).items()}
        except (OSError, ValueError, TypeError, IndexError, KeyError):
            self._models = {}

    def get(self, model: str) -> tuple[str, _V] | None:
        return self._models.get(model)

    def items(self) -> list[tuple[str, tuple[str, _V]]]:
        return list(self._models.items())

    def set(self, model: str, sha: str, value: _V) -> None:
        self._models[model] = (sha, value)
        self._save()

    def clear(self, model: str) -> None:
        if self._models.pop(model, None) is not None:
            self._save()

    def _save(self) -> None:
        body = {m: [sha, v] for m, (sha, v) in self._models.items()}
        self._fs.atomic_write(self.path, json.dumps(body, sort_keys=True).encode())


class _StalledFile:
    """manifest digest -> what the watchdog abandoned (``stalled.json``).

    Written by the watchdog thread the moment a step overruns, so a restart that follows
    (systemd, the hard bound) still rejects the version. An accepted manifest's entry
    (model, group, version, sequence, issued_at, sha256) is removed once the store holds
    the rejection (bad mark + sequence); an unverified one (stalled while checking) keeps
    only its digest, ``reported``, so the same manifest is skipped, never trusted."""

    def __init__(self, path: Path, fs: FileSystem) -> None:
        self.path = path
        self._fs = fs
        try:
            raw = json.loads(path.read_bytes()) if path.exists() else {}
            self._entries = {str(k): dict(v) for k, v in dict(raw).items()}
        except (OSError, ValueError, TypeError):
            self._entries = {}

    def entries(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._entries.items()}

    def add(self, digest: str, entry: Mapping[str, Any]) -> None:
        self._entries[digest] = dict(entry)
        self._save()

    def settle(self, *digests: str) -> None:
        """Their rejection is recorded in the store, or reported: keep what skips them."""
        if not any(d in self._entries for d in digests):
            return
        for digest in digests:
            entry = self._entries.get(digest)
            if entry is None:
                continue
            if entry.get("sha256"):
                del self._entries[digest]
            else:
                entry["reported"] = True
        unverified = [d for d, e in self._entries.items() if not e.get("sha256")]
        for digest in unverified[:-MAX_STALLED_DIGESTS]:
            del self._entries[digest]
        self._save()

    def _save(self) -> None:
        if not self._entries and not self.path.exists():
            return
        body = json.dumps(self._entries, sort_keys=True).encode()
        self._fs.atomic_write(self.path, body)


class _UndeployedFile:
    """model -> "keep" | "stop" for models a signed undeploy said are not desired."""

    def __init__(self, path: Path, fs: FileSystem) -> None:
        self.path = path
        self._fs = fs
        try:
            raw = json.loads(path.read_bytes()) if path.exists() else {}
        except (OSError, ValueError):
            raw = {}
        self._models: dict[str, str] = {str(k): str(v) for k, v in dict(raw).items()}

    def has(self, model: str) -> bool:
        return model in self._models

    def stops(self, model: str) -> bool:
        return self._models.get(model) == "stop"

    def set(self, model: str, *, stop: bool) -> None:
        self._models[model] = "stop" if stop else "keep"
        self._save()

    def clear(self, model: str) -> None:
        if self._models.pop(model, None) is not None:
            self._save()

    def _save(self) -> None:
        self._fs.atomic_write(self.path, json.dumps(self._models, sort_keys=True).encode())
