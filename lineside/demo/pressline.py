"""A synthetic press line: a few presses whose sensors drift with tool wear and show faults.

Each reading has vibration (mm/s RMS), temperature (deg C), motor current (A) and cycle
time (s). Wear slowly raises vibration and current; injected faults (a bearing going,
a coolant loss, a jam) push single readings far out. The ``defect`` flag is what a
quality classifier learns: it follows wear and faults with some noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FEATURES = ("vibration", "temperature", "motor_current", "cycle_time")


@dataclass
class Press:
    press_id: str
    rng: np.random.Generator
    wear: float = 0.0
    base: tuple[float, float, float, float] = (2.0, 45.0, 12.0, 4.0)
    fault_rate: float = 0.03
    cycle: int = 0
    faults: int = field(default=0)

    def reading(self) -> dict[str, float | str | int]:
        """One sensor message's fields (numbers as a PLC gateway would send them)."""
        self.cycle += 1
        self.wear = min(self.wear + self.rng.uniform(0, 2e-4), 1.0)
        vib = self.base[0] * (1 + 0.8 * self.wear) + self.rng.normal(0, 0.15)
        temp = self.base[1] + 6 * self.wear + self.rng.normal(0, 0.8)
        cur = self.base[2] * (1 + 0.3 * self.wear) + self.rng.normal(0, 0.4)
        cyc = self.base[3] + 0.2 * self.wear + self.rng.normal(0, 0.05)
        fault = self.rng.random() < self.fault_rate
        if fault:
            self.faults += 1
            kind = self.rng.integers(3)
            if kind == 0:  # bearing
                vib *= self.rng.uniform(2.5, 4.0)
            elif kind == 1:  # coolant loss
                temp += self.rng.uniform(15, 30)
            else:  # jam
                cur *= self.rng.uniform(1.6, 2.2)
                cyc *= self.rng.uniform(1.5, 2.5)
        return {
            "press": self.press_id,
            "cycle": self.cycle,
            "vibration": round(float(vib), 4),
            "temperature": round(float(temp), 3),
            "motor_current": round(float(cur), 3),
            "cycle_time": round(float(cyc), 4),
            "fault": bool(fault),
        }


def make_line(n_presses: int = 3, seed: int = 7) -> list[Press]:
    root = np.random.default_rng(seed)
    return [
        Press(f"press-{i + 1}", np.random.default_rng(root.integers(1 << 31)), wear=0.1 * i)
        for i in range(n_presses)
    ]


def training_data(
    rows: int = 3000, seed: int = 11, wear_shift: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Historic readings ``X`` [rows, 4] and defect labels ``y`` for training."""
    line = make_line(4, seed)
    X, y = [], []
    rng = np.random.default_rng(seed + 1)
    for i in range(rows):
        press = line[i % len(line)]
        press.wear = min(1.0, press.wear + wear_shift / rows)
        r = press.reading()
        X.append([float(r[f]) for f in FEATURES])  # type: ignore[arg-type]
        risk = 0.6 * press.wear + (0.9 if r["fault"] else 0.0)
        y.append(int(rng.random() < min(0.95, 0.03 + risk * 0.6)))
    return np.asarray(X), np.asarray(y)
