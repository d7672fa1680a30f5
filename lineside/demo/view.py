"""The demo's live terminal view (rich): device model, throughput, anomalies, latency,
drift, outbox depth and the step/event log."""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from lineside.demo.files import DEVICE_ID, MODELS


class LiveView:
    """Redraws :meth:`render` four times a second from ``demo.monitor`` and ``demo.steps``."""

    def __init__(self, demo: Any) -> None:
        self.demo = demo
        self._stop = threading.Event()
        self._live = Live(self.render(), refresh_per_second=4, transient=False)
        self._thread = threading.Thread(target=self._loop, name="demo-view", daemon=True)

    def __enter__(self) -> LiveView:
        self._live.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._live.update(self.render())
        self._live.__exit__(None, None, None)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self._live.update(self.render())

    def render(self) -> Group:
        return Group(self._device_table(), self._press_table(), self._log_panel())

    def _device_table(self) -> Table:
        monitor = self.demo.monitor
        table = Table(title=f"device {DEVICE_ID}", expand=True)
        for column in (
            "model",
            "version",
            "variant",
            "pred/s",
            "p50 ms",
            "p99 ms",
            "max PSI",
            "outbox",
            "dropped",
        ):
            table.add_column(column)
        if monitor is None:
            return table
        with monitor.lock:
            state = dict(monitor.state)
            telemetry = dict(monitor.telemetry)
        outbox = telemetry.get("outbox") or {}
        models_t = telemetry.get("models") or {}
        for name in MODELS:
            entry = (state.get("models") or {}).get(name) or {}
            tm = models_t.get(name) or {}
            latency = tm.get("latency_ms") or {}
            psi_values = _psi_values(tm.get("drift"))
            table.add_row(
                name,
                str(entry.get("version", "-")),
                str(entry.get("variant", "-")),
                f"{monitor.rate(name):.1f}",
                _num(latency.get("p50")),
                _num(latency.get("p99")),
                _num(max(psi_values) if psi_values else None),
                str(outbox.get("depth", "-")),
                str(outbox.get("dropped", "-")),
            )
        return table

    def _press_table(self) -> Table:
        monitor = self.demo.monitor
        table = Table(title="anomaly rate per press", expand=True)
        for column in ("press", "rows", "anomalies", "rate"):
            table.add_column(column)
        if monitor is None:
            return table
        with monitor.lock:
            rows = dict(monitor.rows_per_press)
            anomalies = dict(monitor.anomalies)
        for press in sorted(rows):
            n = rows[press]
            found = anomalies.get(press, 0)
            table.add_row(press, str(n), str(found), f"{found / max(n, 1):.1%}")
        return table

    def _log_panel(self) -> Panel:
        lines = [f"{t:6.1f}s {status:4} {text}" for t, status, text in self.demo.steps.lines[-8:]]
        monitor = self.demo.monitor
        if monitor is not None:
            with monitor.lock:
                events = list(monitor.events)[-6:]
            lines += [
                f"{at:6.1f}s event {e.get('kind', '')}/{e.get('code', '')}: "
                f"{e.get('message', '')}"[:120]
                for at, e in events
            ]
        return Panel("\n".join(lines) or "starting...", title="steps and device events")


def _num(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def _psi_values(drift: Any) -> list[float]:
    """Every ``psi`` under ``drift.features`` and ``drift.outputs`` (protocol section 8.3)."""
    values: list[float] = []
    if not isinstance(drift, dict):
        return values
    for section in ("features", "outputs"):
        entries = drift.get(section)
        if isinstance(entries, dict):
            for entry in entries.values():
                psi = entry.get("psi") if isinstance(entry, dict) else None
                if isinstance(psi, (int, float)):
                    values.append(float(psi))
    return values
