"""Issue 6.6: store-and-forward through a broker outage, the agent killed with SIGKILL.

The agent is the real ``edge_agent.agent.Agent`` (engine, SQLite outbox, pump, ``MqttLink``)
in a child process (``python -m tests.support.outage``), on a real Mosquitto with
persistence. The first incarnation connects, the broker is SIGKILLed (the outage starts)
and from then on the child produces predictions at a steady rate from a deterministic input
generator (``engine.submit``: with the broker down nothing comes over MQTT). Every
``kill_every_s`` (with jitter) the test SIGKILLs the child and starts a new one on the same
state directory. When the outage ends the last producing child is killed too, the broker
comes back, the agent starts a last time and a persistent consumer drains the backlog.

Each child journals every micro-batch the outbox durably accepted (``put`` returned: seq
and source index); a batch cut by the kill between commit and journal line is recovered
from the outbox file (tests/support/outage.py). The test samples, per incarnation, the
child's VmRSS and the outbox files' size on disk.

Below capacity: everything stored arrives (every ``(device, seq)``; dedupe by seq,
at-least-once), nothing unknown arrives, first arrivals in ``seq`` order and in production
order, each incarnation's stored messages a contiguous prefix of what it produced, dropped
counter 0, outbox within its cap, RSS of the last incarnation within a bound of the first.
At capacity (``outbox_max_bytes`` at its 64 KiB minimum): drop-oldest, exactly -- what
arrives is the newest contiguous run of what was stored, the persisted ``dropped`` counter
equals the number stored and not delivered, the telemetry published after the outage
carries it, and after every SIGKILL the next incarnation's telemetry snapshot reports the
counter the dead one persisted.

Default: a 30 s outage, a kill every ~7 s, >= 5,000 predictions (capacity case: 15 s).
``-m slow``: the issue's shape, a 10-minute outage, a kill every ~30 s, >= 100,000
predictions. Figures of the slow run: docs/faults.md section 6.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge_agent.outbox import WAL_LIMIT_BYTES
from edge_agent.protocol.topics import Topics
from tests.support.faults import ROOT, Gateway, pass_health_windows, release
from tests.support.outage import (
    Consumer,
    Incarnation,
    index_of,
    outbox_files_bytes,
    outbox_on_disk,
    predictions_in,
    read_journal,
    rss_kb,
    settle,
)
from tests.support.publisher import wait_until

REPO = Path(__file__).resolve().parents[1]
DEVICE = "gw-1"
TOPICS = Topics(ROOT)
STRIDE = 1_000_000  # incarnation k produces sensor messages k*STRIDE, k*STRIDE+1, ...
# The outbox bound counts topic + payload bytes; on disk SQLite adds its row and page
# overhead (~1.25x) and the WAL, which the outbox checkpoints every 256 pages and truncates
# back to WAL_LIMIT_BYTES (1 MiB). Files are bounded by 1.3 x the logical bytes + this.
SQLITE_OVERHEAD = WAL_LIMIT_BYTES + 2**20
SQLITE_FACTOR = 1.3


@dataclass
class Shape:
    outage_s: float
    kill_every_s: float
    jitter_s: float
    rate: float  # sensor messages per second
    min_predictions: int
    cap: int | None = None  # outbox_max_bytes; None: the default (256 MiB)
    rss_bound_mb: float = 25.0


@dataclass
class Run:
    incarnations: list[Incarnation]
    drain: Incarnation
    persisted: list[dict[str, Any]]  # outbox file after each kill, then after the drain
    files_peak: int
    cap: int
    kills: int
    outage_s: float
    drain_s: float | None
    arrivals: list[dict[str, Any]]
    telemetry: list[dict[str, Any]]
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def stored(self) -> list[tuple[int, int]]:
        """Every prediction stored, (seq, index), in seq order."""
        return sorted(p for inc in self.incarnations for p in inc.stored)

    @property
    def messages(self) -> list[tuple[int, ...]]:
        """Every outbox entry stored (the seqs it carries), in order."""
        return sorted(tuple(s for s, _ in m) for inc in self.incarnations for m in inc.messages)

    def predictions(self) -> list[dict[str, Any]]:
        """Every prediction that arrived, duplicates included, in arrival order."""
        return [p for m in self.arrivals for p in predictions_in(m)]


def _config(tmp_path: Path, port: int, cap: int | None) -> Path:
    gw = Gateway(tmp_path, port=port)
    gw.deliver(release(1))
    pass_health_windows(gw)  # v1 confirmed: kills never count as crashed starts of it
    gw.close()
    cfg = tmp_path / "agent.toml"
    if cap is not None:
        text = cfg.read_text().replace("[limits]\n", f"[limits]\noutbox_max_bytes = {cap}\n")
        cfg.write_text(text)
    return cfg


class _Child:
    def __init__(self, cfg: Path, inc: Incarnation, mode: str, rate: float, *extra: str) -> None:
        self.inc = inc
        self.journal = cfg.parent / f"journal-{inc.number:03d}.jsonl"
        self.stderr = (cfg.parent / f"child-{inc.number:03d}.err").open("wb")
        args = [sys.executable, "-m", "tests.support.outage", mode, str(cfg), str(self.journal)]
        args += ["--incarnation", str(inc.number), "--start", str(inc.start), "--rate", str(rate)]
        self.proc = subprocess.Popen(
            [*args, *extra], cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.stderr
        )
        inc.pid = self.proc.pid

    def sample(self) -> None:
        kb = rss_kb(self.proc.pid)
        if kb is not None and self.proc.poll() is None:
            self.inc.rss_kb.append(kb)

    def kill(self) -> None:
        assert self.proc.poll() is None, (
            f"incarnation {self.inc.number} died by itself: "
            + (self.journal.parent / f"child-{self.inc.number:03d}.err").read_text()[-2000:]
        )
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.stderr.close()

    def statuses(self) -> list[dict[str, Any]]:
        return [r for r in read_journal(self.journal) if r.get("k") == "status"]


def _outage(tmp_path: Path, broker: Any, shape: Shape, seed: int) -> Run:
    rng = random.Random(seed)
    broker.restart(persistence=True)
    cfg = _config(tmp_path, broker.port, shape.cap)
    state = tmp_path / "state"
    db = state / "outbox.db"
    pred_topic = TOPICS.predictions(DEVICE)
    col = Consumer(broker.port, "outage-consumer", pred_topic, TOPICS.telemetry(DEVICE))
    incs: list[Incarnation] = []
    persisted: list[dict[str, Any]] = []
    peak = 0
    children: list[_Child] = []
    try:
        # Incarnation 0 connects; the outage starts under it; it produces from then on.
        incs.append(Incarnation(0, 0))
        child = _Child(cfg, incs[0], "produce", shape.rate, "--after-disconnect")
        children.append(child)
        # Online with an empty outbox (the setup's events delivered), then the outage.
        assert wait_until(
            lambda: any(s["connected"] and not s["outbox"]["depth"] for s in child.statuses()),
            30,
        ), "the first incarnation never connected and emptied its outbox"
        broker.stop(sig=signal.SIGKILL)
        t_outage = time.monotonic()
        end = t_outage + shape.outage_s
        kills = 0
        while True:
            due = min(
                end,
                time.monotonic()
                + shape.kill_every_s
                + rng.uniform(-shape.jitter_s, shape.jitter_s),
            )
            while time.monotonic() < due:
                child.sample()
                peak = max(peak, outbox_files_bytes(state))
                time.sleep(0.2)
            child.kill()
            kills += 1
            on_disk = outbox_on_disk(db, pred_topic)
            persisted.append(on_disk)
            peak = max(peak, outbox_files_bytes(state))
            settle(child.inc, read_journal(child.journal), on_disk["newest_seq"])
            if end - time.monotonic() < 2.0:
                break  # the outage is over
            incs.append(Incarnation(len(incs), len(incs) * STRIDE))
            child = _Child(cfg, incs[-1], "produce", shape.rate)
            children.append(child)
        outage_s = time.monotonic() - t_outage

        # The broker returns; the agent starts a last time and drains.
        broker.start()
        t_back = time.monotonic()
        drain = Incarnation(len(incs), len(incs) * STRIDE)
        last = _Child(cfg, drain, "drain", 0.0)
        children.append(last)
        expected = {s for inc in incs for s, _ in inc.stored}

        def seen() -> set[int]:
            return {p["seq"] for m in col.on("/predictions") for p in predictions_in(m)}

        def drained() -> bool:
            nonlocal peak
            last.sample()
            peak = max(peak, outbox_files_bytes(state))
            if shape.cap is None:
                return expected <= seen()
            st = last.statuses()
            return bool(st) and st[-1]["connected"] and st[-1]["outbox"]["depth"] == 0

        limit = 120 + len(expected) / 200
        ok = wait_until(drained, limit, interval=0.25)
        drain_s = time.monotonic() - t_back if ok else None
        assert ok, ("backlog not drained", len(seen() & expected), len(expected))
        # Telemetry (QoS 0, every 0.5 s while connected) after the outbox is empty.
        mark = len(col.on("/telemetry"))
        assert wait_until(lambda: len(col.on("/telemetry")) > mark + 1, 10)
        time.sleep(0.5)  # late duplicates, if any
        last.sample()
        last.kill()
        persisted.append(outbox_on_disk(db, pred_topic))
        settle(drain, read_journal(last.journal), None)
        return Run(
            incarnations=incs,
            drain=drain,
            persisted=persisted,
            files_peak=peak,
            cap=shape.cap or 256 * 2**20,
            kills=kills,
            outage_s=outage_s,
            drain_s=drain_s,
            arrivals=col.on("/predictions"),
            telemetry=col.on("/telemetry")[mark:],
        )
    finally:
        col.close()
        for c in children:  # a failed run leaves no agent behind
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait(10)


def _common_checks(run: Run, shape: Shape) -> dict[int, int]:
    """Checks of both cases; returns seq -> index of everything stored."""
    stored = run.stored
    seq_to_index = dict(stored)
    assert len(seq_to_index) == len(stored), "a seq was stored twice"
    # Production order is seq order: seqs and indices rise together.
    indices = [i for _, i in stored]
    assert indices == sorted(indices), "seq order differs from production order"
    for inc in run.incarnations:
        produced = [i for _, i in sorted(inc.stored)]
        # Accepted messages are a contiguous prefix of what this incarnation produced:
        # no input lost in the engine (overload), nothing accepted twice.
        assert produced == list(range(inc.start, inc.start + len(produced))), inc.number
        assert inc.statuses, f"incarnation {inc.number} never reported"
        assert all(not s["input_errors"] for s in inc.statuses), inc.statuses[-1]
        assert not inc.others, inc.others  # only predictions entered the outbox
        assert all(s["outbox"]["bytes"] <= run.cap for s in inc.statuses)
        assert inc.rss_kb, f"incarnation {inc.number}: no RSS sample"
    assert len(stored) >= shape.min_predictions, (len(stored), shape.min_predictions)
    # The outbox never exceeds its bound (logical bytes) -- after every SIGKILL too.
    assert all(p["bytes"] <= run.cap for p in run.persisted)
    logical_peak = max(
        [p["bytes"] for p in run.persisted]
        + [s["outbox"]["bytes"] for i in run.incarnations for s in i.statuses]
    )
    assert run.files_peak <= SQLITE_FACTOR * logical_peak + SQLITE_OVERHEAD, (
        run.files_peak,
        logical_peak,
    )
    # Telemetry after a kill -9 reports what the dead process persisted.
    after_kill = run.persisted[: len(run.incarnations)]
    for before, inc in zip(after_kill, [*run.incarnations[1:], run.drain], strict=True):
        assert inc.statuses[0]["outbox"]["dropped"] == before["dropped"], inc.number
    counters = [p["dropped"] for p in run.persisted]
    assert counters == sorted(counters), "the dropped counter went down"
    # RSS flat: the backlog on disk does not grow the process. First incarnation against
    # the last full-length one (the very last is cut short by the end of the outage).
    producing = run.incarnations[:-1] or run.incarnations
    first, last = max(producing[0].rss_kb), max(producing[-1].rss_kb)
    assert (last - first) / 1024 < shape.rss_bound_mb, (first, last)
    return seq_to_index


def _figures(run: Run) -> dict[str, Any]:
    seqs = [p["seq"] for p in run.predictions()]
    return {
        "predictions stored": len(run.stored),
        "outbox entries stored": len(run.messages),
        "kills": run.kills,
        "incarnations": len(run.incarnations) + 1,
        "outage_s": round(run.outage_s, 1),
        "arrived distinct": len(set(seqs)),
        "duplicates": len(seqs) - len(set(seqs)),
        "recovered (committed, killed before journaling)": sum(
            len(i.recovered) for i in run.incarnations
        ),
        "messages arrived": len(run.arrivals),
        "rss_mb max per incarnation": [
            round(max(i.rss_kb) / 1024, 1) for i in [*run.incarnations, run.drain] if i.rss_kb
        ],
        "outbox files peak bytes": run.files_peak,
        "outbox logical peak bytes": max(
            [p["bytes"] for p in run.persisted]
            + [s["outbox"]["bytes"] for i in run.incarnations for s in i.statuses]
        ),
        "dropped": run.persisted[-1]["dropped"],
        "drain_s": None if run.drain_s is None else round(run.drain_s, 1),
    }


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(Shape(30, 7, 1.5, 300, 5_000), id="30s-outage"),
        pytest.param(
            Shape(600, 30, 5, 220, 100_000, rss_bound_mb=20),
            id="10min-outage",
            marks=[pytest.mark.slow, pytest.mark.timeout(1800)],
        ),
    ],
)
def test_outage_with_kill_9_below_capacity_loses_nothing_and_keeps_order(
    tmp_path: Path, broker: Any, shape: Shape
) -> None:
    run = _outage(tmp_path, broker, shape, seed=6)
    print("\noutage figures:", _figures(run))
    seq_to_index = _common_checks(run, shape)
    assert run.kills >= 3
    firsts: dict[int, dict[str, Any]] = {}
    for p in run.predictions():
        assert p["device"] == DEVICE
        firsts.setdefault(p["seq"], p)
    # Every stored (device, seq) arrived, and nothing else did.
    assert set(firsts) == set(seq_to_index), (
        "lost",
        len(set(seq_to_index) - set(firsts)),
        "unknown",
        len(set(firsts) - set(seq_to_index)),
    )
    seqs = list(firsts)
    assert seqs == sorted(seqs), "order per device broken"
    assert all(index_of(p) == seq_to_index[s] for s, p in firsts.items()), "seq <-> input mixed"
    assert run.persisted[-1]["dropped"] == 0 and run.persisted[-1]["depth"] == 0
    assert all(t["outbox"]["dropped"] == 0 for t in run.telemetry)


def test_outage_with_kill_9_at_capacity_drops_exactly_the_oldest_and_counts_them(
    tmp_path: Path, broker: Any
) -> None:
    shape = Shape(15, 5, 1, 200, 1_500, cap=65_536)
    run = _outage(tmp_path, broker, shape, seed=66)
    print("\noutage figures:", _figures(run))
    seq_to_index = _common_checks(run, shape)
    assert run.kills >= 2
    seqs = list(dict.fromkeys(p["seq"] for p in run.predictions()))
    assert set(seqs) <= set(seq_to_index), "an unknown prediction arrived"
    assert seqs == sorted(seqs), "order per device broken"
    # Drop-oldest works on outbox entries (one message: one micro-batch's predictions).
    order = run.messages
    arrived = list(dict.fromkeys(tuple(p["seq"] for p in predictions_in(m)) for m in run.arrivals))
    assert set(arrived) <= set(order), (
        "an unknown or altered message arrived",
        [(m, [o for o in order if set(o) & set(m)]) for m in arrived if m not in set(order)][:5],
    )
    # Exactly the newest contiguous run of what was stored survives, in order.
    assert 0 < len(arrived) < len(order)
    assert arrived == order[len(order) - len(arrived) :], "not exactly the newest run"
    dropped = run.persisted[-1]["dropped"]
    # Only predictions entered the outbox (``others`` is empty, checked above): every
    # stored entry was delivered or counted.
    assert dropped == len(order) - len(arrived), (dropped, len(order), len(arrived))
    assert run.telemetry and all(t["outbox"]["dropped"] == dropped for t in run.telemetry)
    # Drops happened in several incarnations, and the count survived each SIGKILL.
    assert len({p["dropped"] for p in run.persisted[:-1]}) >= 2
