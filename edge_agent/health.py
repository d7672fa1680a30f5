"""The health window after an activation: errors, NaN outputs and latency against a budget.

Pure logic: the inference loop feeds it each batch's outcome; ``verdict()`` says
``pending``, ``healthy`` (the window passed) or ``failed`` with the reason. A failed
window makes the agent roll back and mark the version bad.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_ROWS = 20  # fewer rows than this cannot judge an error rate or a percentile


@dataclass
class HealthWindow:
    started: float
    window_s: float
    max_error_rate: float
    latency_budget_ms: float
    rows: int = 0
    errors: int = 0
    nan_rows: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def record(self, *, rows: int, errors: int, nan_rows: int, latency_ms: float) -> None:
        self.rows += rows
        self.errors += errors
        self.nan_rows += nan_rows
        if len(self.latencies_ms) < 10_000:
            self.latencies_ms.append(latency_ms)

    def verdict(self, now: float) -> tuple[str, str | None]:
        total = self.rows + self.errors
        if total >= MIN_ROWS:
            if self.nan_rows:
                return "failed", f"{self.nan_rows} of {self.rows} rows gave NaN or infinite outputs"
            rate = self.errors / total
            if rate > self.max_error_rate:
                return "failed", f"inference error rate {rate:.1%} over {self.max_error_rate:.1%}"
            p99 = _p99(self.latencies_ms)
            if p99 > self.latency_budget_ms:
                return (
                    "failed",
                    f"p99 latency {p99:.1f} ms over the {self.latency_budget_ms} ms budget",
                )
        if now - self.started >= self.window_s:
            return "healthy", None
        return "pending", None


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
