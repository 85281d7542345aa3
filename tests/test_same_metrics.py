"""experiments/same_metrics.py: its TOML writer and its metrics comparison (no training)."""

import importlib.util
import math
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def _load():
    path = ROOT / "experiments" / "same_metrics.py"
    spec = importlib.util.spec_from_file_location("same_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sm = _load()


def _equal(a, b, ordered=True) -> bool:  # == with types (and key order), NaN equal to NaN
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        keys = list(a) == list(b) if ordered else sorted(a) == sorted(b)
        return keys and all(_equal(a[k], b[k], ordered) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y, ordered) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_toml_writer_round_trips_every_config(path):
    raw = tomllib.loads(path.read_text())
    assert _equal(tomllib.loads(sm.dumps_toml(raw)), raw)


def test_toml_writer_odd_values_and_overrides():
    raw = {
        "a": {"s": 'q"\\\n\tü', "f": [1e-05, 1e300, -0.0, math.inf, -math.inf], "b": False},
        "b": {"c": {"d": {"x": 1}}, "e": 2, "inline": {"k": [1, 2]}},
        "dotted key": {"x.y": 3},
    }
    back = tomllib.loads(sm.dumps_toml(raw))
    assert _equal(back, raw, ordered=False)  # [b.c] is written after b's other keys
    nan = tomllib.loads(sm.dumps_toml({"t": {"v": math.nan}}))["t"]["v"]
    assert math.isnan(nan)
    over = sm.apply_overrides(raw, {"b.c.d": {"x": 2, "y": 3}, "new.t": {"z": True}})
    assert over["b"]["c"]["d"] == {"x": 2, "y": 3} and over["new"] == {"t": {"z": True}}
    assert raw["b"]["c"]["d"] == {"x": 1}  # the input is left alone


def test_derived_config_keeps_a_relative_data_path(tmp_path):
    dest = sm.derive_config(ROOT / "configs" / "own_table.toml", sm.FAST, tmp_path / "c.toml")
    raw = tomllib.loads(dest.read_text())
    assert Path(raw["task"]["path"]) == (ROOT / "configs" / "data" / "blobs.csv").resolve()
    assert raw["train"]["eval_every"] == 5 and raw["train"]["checkpoint_every"] == 5


LINES = [
    {"step": 0, "seconds": 0.0, "val_nll": 6.41, "t1": None, "lr": 0.0},
    {"step": 5, "seconds": 0.63, "val_nll": 6.37, "t1": 1.0, "lr": 0.01, "damping": math.nan},
]


def _copy(lines):
    return [dict(r) for r in lines]


def test_comparison_ignores_wall_clock_but_not_t1():
    other = _copy(LINES)
    other[1]["seconds"] = 9.9
    assert sm.compare_records(LINES, other) is None  # NaN equals NaN, seconds ignored
    other[1]["t1"] = 1.5
    assert "t1" in sm.compare_records(LINES, other)
    assert sm.is_ignored("train_seconds") and sm.is_ignored("step_time_s")
    assert sm.is_ignored("peak_memory_mb") and not sm.is_ignored("t1")
    assert not sm.is_ignored("stopped_by_time") and not sm.is_ignored("memory_method")


def test_comparison_catches_one_ulp_and_a_missing_line():
    other = _copy(LINES)
    other[1]["lr"] = math.nextafter(0.01, 1.0)
    d = sm.compare_records(LINES, other)
    assert d is not None and d.startswith("step 5: lr")
    assert "missing in AFTER" in sm.compare_records(LINES, LINES[:1])
    assert "missing in BEFORE" in sm.compare_records(LINES[:1], LINES)
    other = _copy(LINES)
    other[0]["step"] = 0.0  # an int that became a float
    assert sm.compare_records(LINES, other) is not None


def test_summary_comparison_ignores_nested_wall_clock(tmp_path):
    import json

    summary = {"steps": 12, "test": {"nll": 4.04}, "train_seconds": 1.2, "mean_step_s": 0.1}
    for name, seconds, nll in (("a", 1.2, 4.04), ("b", 3.4, 4.04), ("c", 1.2, 4.05)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps(LINES[0]) + "\n")
        s = dict(summary, train_seconds=seconds, test={"nll": nll})
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    assert sm.compare_run(tmp_path / "a", tmp_path / "b") == "identical"
    assert "summary.json test" in sm.compare_run(tmp_path / "a", tmp_path / "c")
    assert sm.compare_run(tmp_path / "a", tmp_path / "nope").startswith("missing")
