"""Issue 6.3: the failure table of the update state machine.

For every state of ``edge_agent.updater`` (plus ``watched``, the health window after
activation) and every fault in {exception, kill, hang past the deadline, state store
read-only}, the function the updater calls in that state is wrapped to inject the fault,
and the exact chain of states and the outcome are asserted against ``TABLE`` (also printed
in docs/faults.md). The gateway serves v1 (sequence 1); the update is to v2 (sequence 2).

Faults:
- ``exception``: the state's call raises ``RuntimeError``;
- ``kill``: it raises ``SimulatedCrash`` (the process dies there); the gateway restarts on
  the same disk, then the broker re-delivers the retained manifest and chunks;
- ``hang``: the state's call blocks (an ``Event`` wait, bounded at 10 s so the test never
  hangs) on the updater's thread; the watchdog check runs with its clock past
  ``limits.step_deadline_s`` (no sleeping), the process is "restarted" on a copy of the disk
  taken while the call is still stuck (what systemd's restart sees), then the call returns
  in the original process;
- ``readonly``: from that state on every mutating filesystem call fails with ``EROFS``.

Outcomes: ``committed`` (v2 serving and confirmed by its health window), ``failed`` (v1
still serving, the failure reported as an event with the code shown), ``rolled_back`` (v2
was serving, v1 is back, v2 marked bad), for ``kill`` ``<after restart> -> <after
re-delivery>``, and for ``hang`` ``<when the stuck call returns> / restart: <after a restart
while it is stuck>``.
"""

from __future__ import annotations

import dataclasses
import errno
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import edge_agent.updater as updater_mod
from edge_agent.fsio import FileSystem, SimulatedCrash
from edge_agent.health import HealthWindow
from edge_agent.protocol.chunks import ChunkAssembler
from edge_agent.store import ModelStore
from edge_agent.updater import MAX_UNCONFIRMED_STARTS, STALL_RESTART_FACTOR
from tests.support.faults import (
    Gateway,
    copy_tree,
    leftovers,
    pass_health_windows,
    release,
    wait_for,
)

V1, V2 = release(1), release(2)

# state -> (object, attribute) the updater calls while in that state
TARGETS: dict[str, tuple[Any, str]] = {
    "checking": (updater_mod, "check_manifest"),
    "downloading": (ChunkAssembler, "add"),
    "verifying": (ChunkAssembler, "finish"),
    "installing": (ModelStore, "install"),
    "loading": (updater_mod, "load_model"),
    "smoke_test": (updater_mod, "check_golden"),
    "activating": (ModelStore, "activate"),
    "watched": (HealthWindow, "verdict"),
}
FAULTS = ("exception", "kill", "hang", "readonly")

D, V, N, L, S, A = "downloading", "verifying", "installing", "loading", "smoke_test", "activating"
FULL = ["checking", D, V, N, L, S, A, "idle"]
STALLED = "failed / restart: old, not retried"  # a hang in an update state

# (state, fault) -> (chain of states of the update, outcome, error codes reported)
TABLE: dict[tuple[str, str], tuple[list[str], str, list[str]]] = {
    ("checking", "exception"): (["checking", "idle"], "failed", ["internal_error"]),
    ("checking", "kill"): (["checking"], "old -> committed", []),
    ("checking", "hang"): (["checking", "idle"], STALLED, ["update_stalled"]),
    ("checking", "readonly"): (["checking", "idle"], "failed", ["store_error"]),
    ("downloading", "exception"): (["checking", D, "idle"], "failed", ["internal_error"]),
    ("downloading", "kill"): (["checking", D], "old -> committed", []),
    ("downloading", "hang"): (["checking", D, "idle"], STALLED, ["update_stalled"]),
    ("downloading", "readonly"): (["checking", D, "idle"], "failed", ["store_error"]),
    ("verifying", "exception"): (["checking", D, V, "idle"], "failed", ["internal_error"]),
    ("verifying", "kill"): (["checking", D, V], "old -> committed", []),
    ("verifying", "hang"): (["checking", D, V, "idle"], STALLED, ["update_stalled"]),
    ("verifying", "readonly"): (["checking", D, V, "idle"], "failed", ["store_error"]),
    ("installing", "exception"): (["checking", D, V, N, "idle"], "failed", ["internal_error"]),
    ("installing", "kill"): (["checking", D, V, N], "old -> committed", []),
    ("installing", "hang"): (["checking", D, V, N, "idle"], STALLED, ["update_stalled"]),
    ("installing", "readonly"): (["checking", D, V, N, "idle"], "failed", ["store_error"]),
    ("loading", "exception"): (["checking", D, V, N, L, "idle"], "failed", ["internal_error"]),
    ("loading", "kill"): (["checking", D, V, N, L], "old -> committed", []),
    ("loading", "hang"): (["checking", D, V, N, L, "idle"], STALLED, ["update_stalled"]),
    ("loading", "readonly"): (FULL, "failed", ["store_error"]),
    ("smoke_test", "exception"): (
        ["checking", D, V, N, L, S, "idle"],
        "failed",
        ["internal_error"],
    ),
    ("smoke_test", "kill"): (["checking", D, V, N, L, S], "old -> committed", []),
    ("smoke_test", "hang"): (["checking", D, V, N, L, S, "idle"], STALLED, ["update_stalled"]),
    ("smoke_test", "readonly"): (FULL, "failed", ["store_error"]),
    ("activating", "exception"): (FULL, "failed", ["internal_error"]),
    ("activating", "kill"): (["checking", D, V, N, L, S, A], "old -> committed", []),
    ("activating", "hang"): (FULL, STALLED, ["update_stalled"]),
    ("activating", "readonly"): (FULL, "failed", ["store_error"]),
    ("watched", "exception"): (FULL, "committed", []),
    ("watched", "kill"): (FULL, "new -> committed", []),
    ("watched", "hang"): (FULL, "committed / restart: new -> committed", ["update_stalled"]),
    ("watched", "readonly"): (FULL, "serving unconfirmed", ["store_error"]),
}


class SwitchableFS(FileSystem):
    """Real I/O until ``readonly`` is set; then every mutating call fails with EROFS."""

    readonly = False

    def _mutating(self, op: str, path: Path) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "Read-only file system", str(path))


HANG_BOUND_S = 10.0  # a hung call waits at most this long: the test never hangs


class Hang:
    """A call that blocks on an Event until ``release()`` (bounded by HANG_BOUND_S)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def block(self) -> None:
        self.entered.set()
        assert self.released.wait(HANG_BOUND_S), "the hung call was never released"

    def release(self) -> None:
        self.released.set()


def _inject(
    monkeypatch: pytest.MonkeyPatch,
    gw: Gateway,
    fs: SwitchableFS,
    state: str,
    fault: str,
    hang: Hang | None = None,
) -> dict[str, int]:
    owner, name = TARGETS[state]
    original: Callable[..., Any] = getattr(owner, name)
    fired = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if fired["n"] == 0:
            fired["n"] += 1
            if fault == "exception":
                raise RuntimeError(f"injected in {state}")
            if fault == "kill":
                raise SimulatedCrash(f"killed in {state}")
            if fault == "hang" and hang is not None:
                hang.block()
            if fault == "readonly":
                fs.readonly = True
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return fired


def _outcome(gw: Gateway, since: int) -> str:
    codes = [e["code"] for e in gw.events()[since:]]
    sha = gw.active_sha()
    if sha == V2.sha256:
        return "committed" if "healthy" in codes else "serving unconfirmed"
    if "rolled_back" in codes:
        return "rolled_back"
    assert sha == V1.sha256
    return "failed" if (set(codes) - {"accepted", "installed"}) else "old"


ERRORS = {
    "update_stalled",
    "internal_error",
    "store_error",
    "download_timeout",
    "unsafe_model",
    "load_failed",
    "golden_mismatch",
    "file_hash",
    "chunk_hash",
}


def _restart_while_stuck(gw: Gateway, copy: Path) -> str:
    """The process restarted (systemd) while the call is still stuck: a new gateway on the
    disk as it is now. Returns the outcome after the restart and a re-delivery."""
    again = Gateway(copy_tree(gw.root, copy))
    try:
        since = len(again.events())
        reported = [e for e in again.events() if e.get("restarted")]
        if again.active_sha() == V2.sha256:  # the stall was not in an update (watched)
            assert not reported
            pass_health_windows(again)
            return f"new -> {_outcome(again, since)}"
        assert again.active_sha() == V1.sha256
        assert [e["code"] for e in reported] == ["update_stalled"], reported
        assert reported[0]["version"] in (2, None)
        n = len(again.events())
        again.deliver(V2)  # the retained manifest again: skipped, never downloaded again
        pass_health_windows(again)
        assert again.active_sha() == V1.sha256 and again.events()[n:] == []
        assert not leftovers(again.state_dir)
        return "old, not retried"
    finally:
        again.close()


def run_hang_cell(
    tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch, state: str
) -> tuple[list[str], str, list[str]]:
    root = copy_tree(base, tmp_path / f"{state}-hang")
    gw = Gateway(root)
    before = len(gw.updater.history)
    first_events = len(gw.events())
    hang = Hang()
    fired = _inject(monkeypatch, gw, SwitchableFS(), state, "hang", hang)
    errors: list[BaseException] = []

    def updater_thread() -> None:
        try:
            gw.deliver(V2)
        except BaseException as exc:  # reported to the test's thread
            errors.append(exc)

    worker = threading.Thread(target=updater_thread, name="updater")
    worker.start()
    try:
        assert hang.entered.wait(HANG_BOUND_S), f"{state} was never reached"
        deadline = gw.updater.config.limits.step_deadline_s
        now = time.monotonic()
        assert gw.updater.check_watchdog(now) is None  # within its deadline: nothing
        assert gw.updater.healthy(now)
        stall = gw.updater.check_watchdog(now + deadline + 1)
        assert stall is not None and stall["step"] == state
        assert gw.updater.status()["stalled"]["step"] == stall["step"]
        assert gw.updater.check_watchdog(now + deadline + 2) is None  # flagged once
        assert gw.updater.healthy(now + deadline * STALL_RESTART_FACTOR - 1)
        assert not gw.updater.healthy(now + deadline * STALL_RESTART_FACTOR + 1)
        assert gw.active_sha() == V1.sha256 or state == "watched"  # the old one serves
        restarted = _restart_while_stuck(gw, tmp_path / f"{state}-hang-restarted")
    finally:
        hang.release()
        worker.join(HANG_BOUND_S)
    assert not worker.is_alive() and not errors, errors
    assert fired["n"] == 1
    assert gw.updater.healthy() and "stalled" not in gw.updater.status()
    pass_health_windows(gw)
    chain = [t.value for _, t in gw.updater.history[before:]]
    codes = [e["code"] for e in gw.events()[first_events:] if e["code"] in ERRORS]
    outcome = _outcome(gw, first_events)
    if outcome == "failed":  # the stuck call returned: its result was dropped, not retried
        if state != "checking":  # a verified manifest: marked bad, its sequence used up
            assert gw.store.is_bad(V2.sha256)
            assert gw.store.accepted_sequence("line-1", "pump") == 2
        n = len(gw.events())
        gw.deliver(V2)
        assert gw.active_sha() == V1.sha256 and gw.events()[n:] == []
        assert not leftovers(gw.state_dir)
    gw.close()
    return chain, f"{outcome} / restart: {restarted}", codes


def run_cell(
    tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch, state: str, fault: str
) -> tuple[list[str], str, list[str]]:
    if fault == "hang":
        return run_hang_cell(tmp_path, base, monkeypatch, state)
    root = copy_tree(base, tmp_path / f"{state}-{fault}")
    fs = SwitchableFS()
    gw = Gateway(root, fs=fs)
    before = len(gw.updater.history)
    first_events = len(gw.events())
    fired = _inject(monkeypatch, gw, fs, state, fault)
    killed = False
    try:
        gw.deliver(V2)
        pass_health_windows(gw)
    except SimulatedCrash:
        killed = True
    assert fired["n"] == 1, f"{state} was never reached"
    chain = [gw.updater.history[before][0].value] if len(gw.updater.history) > before else []
    chain = [t.value for _, t in gw.updater.history[before:]]
    codes = [e["code"] for e in gw.events()[first_events:] if e["code"] in ERRORS]
    if not killed:
        outcome = _outcome(gw, first_events)
        gw.close()
        return chain, outcome, codes
    gw.close()
    monkeypatch.undo()
    again = Gateway(root)
    since = len(again.events())
    try:
        after_restart = "new" if again.active_sha() == V2.sha256 else "old"
        assert again.active_sha() in (V1.sha256, V2.sha256)
        again.deliver(V2)  # the broker re-sends the retained manifest and chunks
        pass_health_windows(again)
        return chain, f"{after_restart} -> {_outcome(again, since)}", codes
    finally:
        again.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("table-base")
    gw = Gateway(root)
    gw.deliver(V1)
    pass_health_windows(gw)
    gw.close()
    return root


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("state", list(TARGETS))
def test_failure_table(
    state: str, fault: str, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain, outcome, codes = run_cell(tmp_path, base, monkeypatch, state, fault)
    assert (["checking", *chain[1:]] if chain else chain, outcome, codes) == TABLE[(state, fault)]


def test_table_is_complete() -> None:
    assert set(TABLE) == {(s, f) for s in TARGETS for f in FAULTS}
    assert {s.value for s in updater_mod.State} - {"idle"} <= set(TARGETS)


def test_version_that_kills_every_start_is_rolled_back_after_bounded_attempts(
    tmp_path: Path, base: Path
) -> None:
    """v2 activates, then kills the process on every start before its health window ends
    (a native crash in the runtime): after MAX_UNCONFIRMED_STARTS starts the agent rolls
    back to v1 by itself, reports it, and does not retry v2 until a newer manifest."""
    root = copy_tree(base, tmp_path / "crashy")
    gw = Gateway(root)
    gw.deliver(V2)
    assert gw.active_sha() == V2.sha256  # activated, health window pending
    gw.close()

    real_load = updater_mod.load_model
    starts = 0

    def crashing_load(active: Any, *a: Any, **kw: Any) -> Any:
        nonlocal starts
        if active.sha256 == V2.sha256:
            starts += 1
            raise SimulatedCrash("segfault in the runtime")
        return real_load(active, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(updater_mod, "load_model", crashing_load)
        for _ in range(10):
            try:
                gw = Gateway(root)
                break
            except SimulatedCrash:
                continue
        else:
            pytest.fail("the agent kept crashing: no bound on start attempts")
    assert starts == MAX_UNCONFIRMED_STARTS
    assert gw.active_sha() == V1.sha256
    rolled = gw.events("rolled_back")
    assert len(rolled) == 1 and rolled[0]["version"] == 2 and rolled[0]["starts"] == 3
    assert gw.store.is_bad(V2.sha256)
    assert gw.store.accepted_sequence("line-1", "pump") == 2  # never goes down
    n = len(gw.events())
    gw.deliver(V2)  # the same retained manifest: not retried (settled, skipped silently)
    assert gw.active_sha() == V1.sha256
    assert gw.events()[n:] == []
    v3 = release(3)
    gw.deliver(v3)  # a newer manifest is tried
    assert gw.active_sha() == v3.sha256
    gw.close()


def test_a_version_that_passed_its_window_is_not_counted(tmp_path: Path, base: Path) -> None:
    root = copy_tree(base, tmp_path / "confirmed")
    gw = Gateway(root)
    gw.deliver(V2)
    pass_health_windows(gw)
    assert gw.events("healthy")
    gw.close()
    for _ in range(MAX_UNCONFIRMED_STARTS + 2):
        gw = Gateway(root)
        assert gw.active_sha() == V2.sha256
        gw.close()


def test_clean_stops_do_not_count_as_crashed_starts(tmp_path: Path, base: Path) -> None:
    root = copy_tree(base, tmp_path / "clean")
    gw = Gateway(root)
    gw.deliver(V2)  # activated, health window pending
    gw.close()
    for _ in range(MAX_UNCONFIRMED_STARTS + 2):  # restarted cleanly within the window
        gw = Gateway(root)
        assert gw.active_sha() == V2.sha256
        assert "pump" in gw.updater._watching  # its health window runs again
        gw.updater.stop()
        gw.close()
    gw = Gateway(root)
    assert gw.active_sha() == V2.sha256 and gw.events("rolled_back") == []
    gw.close()


# ---- the watchdog beyond the table -----------------------------------------------------


def test_a_stall_after_the_activation_was_written_is_rolled_back_after_the_restart(
    tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pointer and sequence were written, then the step stuck (a hung fsync in the
    garbage collection, say): the restart finds v2 active with its stalled marker, rolls
    back to v1 and reports it; in the original process the late return is rolled back too
    and v2 never reaches the engine."""
    root = copy_tree(base, tmp_path / "after-activate")
    gw = Gateway(root)
    hang = Hang()
    real_activate = ModelStore.activate

    def activate_then_hang(self: ModelStore, *a: Any, **kw: Any) -> Any:
        out = real_activate(self, *a, **kw)
        hang.block()
        return out

    monkeypatch.setattr(ModelStore, "activate", activate_then_hang)
    worker = threading.Thread(target=gw.deliver, args=(V2,))
    worker.start()
    try:
        assert hang.entered.wait(HANG_BOUND_S)
        deadline = gw.updater.config.limits.step_deadline_s
        stall = gw.updater.check_watchdog(time.monotonic() + deadline + 1)
        assert stall is not None and stall["step"] == "activating"
        assert gw.active_sha() == V1.sha256  # the engine never saw v2
        again = Gateway(copy_tree(root, tmp_path / "after-activate-restarted"))
        try:
            assert again.active_sha() == V1.sha256
            (event,) = [e for e in again.events() if e.get("restarted")]
            assert event["code"] == "update_stalled" and event["rolled_back"] is True
            assert event["step"] == "activating" and event["version"] == 2
            assert again.store.is_bad(V2.sha256)
            assert again.store.accepted_sequence("line-1", "pump") == 2
            assert not (again.state_dir / "stalled.json").exists() or (
                again.updater._stalled_file.entries() == {}
            )
            again.close()
            third = Gateway(again.root)  # reported once, not at every start
            assert [e for e in third.events() if e.get("restarted")] == [event]
            third.close()
        finally:
            again.close()
    finally:
        hang.release()
        worker.join(HANG_BOUND_S)
    assert not worker.is_alive()
    assert gw.active_sha() == V1.sha256
    active = gw.store.active("pump")
    assert active is not None and active.sha256 == V1.sha256
    assert gw.store.is_bad(V2.sha256)
    assert gw.events("activated")[-1]["version"] == 1  # v2 was never announced as serving
    gw.close()


def test_the_watchdog_thread_abandons_a_stuck_load_and_run_exits_for_a_restart(
    tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real threads and real time: the updater thread sticks in onnxruntime session
    creation; inference keeps answering on v1; the watchdog thread reports the stall
    after limits.step_deadline_s (1 s here); past twice that ``Agent.run`` stops pinging
    systemd and returns EXIT_UNHEALTHY. The late return is dropped."""
    from edge_agent.agent import EXIT_UNHEALTHY
    from edge_agent.mqtt import Message

    root = copy_tree(base, tmp_path / "threads")
    gw = Gateway(root)
    limits = dataclasses.replace(gw.updater.config.limits, step_deadline_s=1.0)
    gw.updater.config = dataclasses.replace(gw.updater.config, limits=limits)
    hang = Hang()
    real_load = updater_mod.load_model

    def stuck_load(*a: Any, **kw: Any) -> Any:
        hang.block()
        return real_load(*a, **kw)

    monkeypatch.setattr(updater_mod, "load_model", stuck_load)
    sent: list[str] = []
    monkeypatch.setattr("edge_agent.agent.sd_notify", lambda m: sent.append(m) or True)
    real_stop = gw.agent.stop

    def stop(timeout: float = 5.0) -> None:
        hang.release()  # the process would be gone; here the thread must end
        real_stop(timeout)

    monkeypatch.setattr(gw.agent, "stop", stop)
    gw.updater.start()
    try:
        manifest_topic = gw.topics.manifest("line-1", "pump")
        gw.updater._on_manifest_message(Message(manifest_topic, V2.wire, 1, True))
        for cid, data in V2.chunks():
            gw.updater._on_chunk_message(Message(gw.topics.chunk(cid), data, 1, True))
        assert hang.entered.wait(HANG_BOUND_S)
        t0 = time.monotonic()
        assert wait_for(lambda: gw.events("update_stalled"), timeout=5.0)
        (event,) = gw.events("update_stalled")
        assert event["step"] == "loading" and event["version"] == 2 and event["persisted"]
        assert 1.0 <= event["elapsed_s"] < 3.0
        assert (gw.state_dir / "stalled.json").is_file()
        assert gw.predict().shape == (1, 1) and gw.active_sha() == V1.sha256  # still serving
        code = gw.agent.run(tick_s=0.05)
        waited = time.monotonic() - t0
    finally:
        hang.release()
        gw.updater.stop()
    assert code == EXIT_UNHEALTHY
    assert waited < 3.0  # the hard bound: 2 x 1 s from the step's start
    assert "STOPPING=1" in sent and sent[-1] == "STOPPING=1"  # no WATCHDOG=1 after it
    assert gw.active_sha() == V1.sha256 and gw.store.is_bad(V2.sha256)


def test_step_deadline_is_a_validated_config_key(tmp_path: Path) -> None:
    from edge_agent.config import load_config
    from edge_agent.errors import ConfigError
    from tests.support.faults import write_agent_config

    cfg = write_agent_config(tmp_path / "agent.toml", tmp_path / "state")
    assert load_config(cfg).limits.step_deadline_s == 300.0
    text = cfg.read_text()
    cfg.write_text(text.replace("[limits]\n", "[limits]\nstep_deadline_s = 45\n"))
    assert load_config(cfg).limits.step_deadline_s == 45.0
    cfg.write_text(text.replace("[limits]\n", "[limits]\nstep_deadline_s = 0\n"))
    with pytest.raises(ConfigError, match=r"\[limits\]\.step_deadline_s"):
        load_config(cfg)


# ---- a failed health window with nothing to roll back to --------------------------------


def _fail_health_window(gw: Gateway) -> None:
    loaded = gw.updater._watching["pump"]
    assert loaded.health is not None
    loaded.health.record(rows=30, errors=0, nan_rows=30, latency_ms=1.0)
    gw.step("tick", None)


def test_first_version_failing_its_health_window_keeps_serving_degraded(
    tmp_path: Path,
) -> None:
    gw = Gateway(tmp_path / "first")
    gw.deliver(V1)  # the first model this device ever runs
    _fail_health_window(gw)
    assert gw.active_sha() == V1.sha256  # serving it beats serving nothing
    gw.predict()
    (event,) = gw.events("rollback_unavailable")
    assert event["version"] == 1 and event["degraded"] is True and "NaN" in event["reason"]
    assert gw.events("rolled_back") == []
    assert "pump" not in gw.updater._watching
    assert gw.updater.snapshot["pump"]["degraded"] == event["reason"]
    assert not gw.store.is_bad(V1.sha256)  # it must survive a restart as the active one
    gw.close()

    gw = Gateway(tmp_path / "first")  # after a restart: still serving, still degraded
    assert gw.active_sha() == V1.sha256 and "pump" not in gw.updater._watching
    assert gw.updater.snapshot["pump"]["degraded"] == event["reason"]
    n = len(gw.events())
    gw.deliver(V1)  # the same retained manifest: nothing happens
    assert gw.events()[n:] == []
    gw.deliver(V2)  # a newer manifest replaces it
    pass_health_windows(gw)
    assert gw.active_sha() == V2.sha256 and "degraded" not in gw.updater.snapshot["pump"]
    assert gw.events("healthy")
    gw.close()


def test_a_failed_window_with_a_previous_version_still_rolls_back(
    tmp_path: Path, base: Path
) -> None:
    gw = Gateway(copy_tree(base, tmp_path / "with-previous"))
    gw.deliver(V2)
    _fail_health_window(gw)
    assert gw.active_sha() == V1.sha256
    assert gw.events("rolled_back") and gw.events("rollback_unavailable") == []
    assert "degraded" not in gw.updater.snapshot["pump"]
    gw.close()
