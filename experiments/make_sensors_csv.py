"""Generate configs/data/sensors.csv: 60 irregular 2-channel series, two classes.

The bundled example of own time series (configs/own_series.toml). Each series observes
its own subset of a 0.25 s grid; "steady" series oscillate at 0.25-0.45 Hz, "shaky" ones
at 0.7-1.0 Hz; about 6% of the rows have one empty cell (not observed).

    python experiments/make_sensors_csv.py
"""

from pathlib import Path

import numpy as np

rng = np.random.default_rng(7)
grid = np.arange(0, 41) * 0.25  # seconds: every series observes its own subset of this grid
rows = ["series,time,accel,gyro,label"]
for k in range(60):
    label = ["steady", "shaky"][k % 2]
    freq = rng.uniform(0.25, 0.45) if label == "steady" else rng.uniform(0.7, 1.0)
    phase, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 1.4)
    start = rng.integers(0, 9)
    n = rng.integers(12, 25)
    idx = np.sort(rng.choice(np.arange(start, 41), size=min(n, 41 - start), replace=False))
    for i in idx:
        t = grid[i]
        a = amp * np.sin(2 * np.pi * freq * t + phase) + 0.1 * rng.normal()
        g = amp * 2 * np.pi * freq * np.cos(2 * np.pi * freq * t + phase) / 4 + 0.1 * rng.normal()
        cells = [f"{a:.3f}", f"{g:.3f}"]
        if rng.random() < 0.06:
            cells[rng.integers(0, 2)] = ""
        rows.append(f"s{k:02d},{t + 100:.2f},{cells[0]},{cells[1]},{label}")
open(Path(__file__).resolve().parents[1] / "configs" / "data" / "sensors.csv", "w").write(
    "\n".join(rows) + "\n"
)
print(len(rows) - 1, "rows")
