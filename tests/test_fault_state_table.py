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
- ``hang``: the update deadline passes while the state's call runs (the clock is moved, no
  real sleeping), then the call returns;
- ``readonly``: from that state on every mutating filesystem call fails with ``EROFS``.

Outcomes: ``committed`` (v2 serving and confirmed by its health window), ``failed`` (v1
still serving, the failure reported as an event with the code shown), ``rolled_back`` (v2
was serving, v1 is back, v2 marked bad), and for ``kill`` ``<after restart> -> <after
re-delivery>``.
"""

from __future__ import annotations

import errno
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
from edge_agent.updater import MAX_UNCONFIRMED_STARTS
from tests.support.faults import Gateway, copy_tree, pass_health_windows, release

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

# (state, fault) -> (chain of states of the update, outcome, error codes reported)
TABLE: dict[tuple[str, str], tuple[list[str], str, list[str]]] = {
    ("checking", "exception"): (["checking", "idle"], "failed", ["internal_error"]),
    ("checking", "kill"): (["checking"], "old -> committed", []),
    ("checking", "hang"): (FULL, "committed", []),
    ("checking", "readonly"): (["checking", "idle"], "failed", ["store_error"]),
    ("downloading", "exception"): (["checking", D, "idle"], "failed", ["internal_error"]),
    ("downloading", "kill"): (["checking", D], "old -> committed", []),
    ("downloading", "hang"): (["checking", D, "idle"], "failed", ["download_timeout"]),
    ("downloading", "readonly"): (["checking", D, "idle"], "failed", ["store_error"]),
    ("verifying", "exception"): (["checking", D, V, "idle"], "failed", ["internal_error"]),
    ("verifying", "kill"): (["checking", D, V], "old -> committed", []),
    ("verifying", "hang"): (FULL, "committed", []),
    ("verifying", "readonly"): (["checking", D, V, "idle"], "failed", ["store_error"]),
    ("installing", "exception"): (["checking", D, V, N, "idle"], "failed", ["internal_error"]),
    ("installing", "kill"): (["checking", D, V, N], "old -> committed", []),
    ("installing", "hang"): (FULL, "committed", []),
    ("installing", "readonly"): (["checking", D, V, N, "idle"], "failed", ["store_error"]),
    ("loading", "exception"): (["checking", D, V, N, L, "idle"], "failed", ["internal_error"]),
    ("loading", "kill"): (["checking", D, V, N, L], "old -> committed", []),
    ("loading", "hang"): (FULL, "committed", []),
    ("loading", "readonly"): (FULL, "failed", ["store_error"]),
    ("smoke_test", "exception"): (
        ["checking", D, V, N, L, S, "idle"],
        "failed",
        ["internal_error"],
    ),
    ("smoke_test", "kill"): (["checking", D, V, N, L, S], "old -> committed", []),
    ("smoke_test", "hang"): (FULL, "committed", []),
    ("smoke_test", "readonly"): (FULL, "failed", ["store_error"]),
    ("activating", "exception"): (FULL, "failed", ["internal_error"]),
    ("activating", "kill"): (["checking", D, V, N, L, S, A], "old -> committed", []),
    ("activating", "hang"): (FULL, "committed", []),
    ("activating", "readonly"): (FULL, "failed", ["store_error"]),
    ("watched", "exception"): (FULL, "committed", []),
    ("watched", "kill"): (FULL, "new -> committed", []),
    ("watched", "hang"): (FULL, "committed", []),
    ("watched", "readonly"): (FULL, "serving unconfirmed", ["store_error"]),
}


class SwitchableFS(FileSystem):
    """Real I/O until ``readonly`` is set; then every mutating call fails with EROFS."""

    readonly = False

    def _mutating(self, op: str, path: Path) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "Read-only file system", str(path))


def _inject(
    monkeypatch: pytest.MonkeyPatch, gw: Gateway, fs: SwitchableFS, state: str, fault: str
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
            if fault == "hang":
                job = gw.updater._job
                if job is not None:
                    job.deadline = time.monotonic() - 1
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
    "internal_error",
    "store_error",
    "download_timeout",
    "unsafe_model",
    "load_failed",
    "golden_mismatch",
    "file_hash",
    "chunk_hash",
}


def run_cell(
    tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch, state: str, fault: str
) -> tuple[list[str], str, list[str]]:
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
