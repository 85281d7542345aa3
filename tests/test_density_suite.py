"""The tabular suite's readers on small synthetic files in the release's formats: every
preprocessing step recomputed by hand, the one-line errors, and a config that trains."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import tiny, write_toml  # noqa: I001  (tests/ is on sys.path)

from node_ocp.data import density_suite as ds
from node_ocp.train import (
    ConfigError,
    RunOptions,
    build_task,
    config_from_dict,
    load_config,
    train,
)

pd = pytest.importorskip("pandas")
h5py = pytest.importorskip("h5py")

ROOT = Path(__file__).resolve().parents[1]


def _close(split, want):
    assert split.x.dtype == torch.float32
    np.testing.assert_allclose(split.x.numpy(), want, rtol=1e-5, atol=1e-5)


def _tail(n):  # the release's (train, validation, test) sizes of n unshuffled rows
    n_test = int(0.1 * n)
    n_val = int(0.1 * (n - n_test))
    return n - n_test - n_val, n_val, n_test


# ----------------------------------------------------------------- writers
def write_power(root: Path, n=60) -> np.ndarray:
    raw = np.random.default_rng(1).normal(size=(n, 8)) + 10 * np.arange(8)
    (root / "power").mkdir(parents=True, exist_ok=True)
    np.save(root / "power" / "data.npy", raw)
    return raw


def write_miniboone(root: Path, n=50, d=5) -> np.ndarray:
    raw = np.random.default_rng(2).gamma(2.0, size=(n, d))
    (root / "miniboone").mkdir(parents=True, exist_ok=True)
    np.save(root / "miniboone" / "data.npy", raw)
    return raw


def write_gas(root: Path, n=100) -> pd.DataFrame:
    """Time, Meth, Eth (the names the release's code drops) and 16 sensors: seven pairs
    correlated above 0.98 and two columns correlated at about 0.9 with each other."""
    g = np.random.default_rng(3)
    base = g.normal(size=(n, 8))
    cols = {"Time": np.arange(n, dtype=float), "Meth": g.random(n), "Eth": g.random(n)}
    for k in range(7):
        cols[f"S{2 * k + 1}"] = base[:, k]
        cols[f"S{2 * k + 2}"] = base[:, k] + 0.01 * g.normal(size=n)
    cols["S15"] = base[:, 7]
    cols["S16"] = base[:, 7] + 0.5 * g.normal(size=n)
    frame = pd.DataFrame(cols)
    (root / "gas").mkdir(parents=True, exist_ok=True)
    frame.to_pickle(root / "gas" / "ethylene_CO.pickle")
    return frame


def write_hepmass(root: Path):
    """Label first, then 6 features; the test file has one column more at the end (the
    column the release's code drops). Signal rows (label 1) and background rows (label 0,
    whose values must not count)."""
    g = np.random.default_rng(4)

    def features(n, repeat_f3, repeat_f4):
        f = g.normal(size=(n, 6)) + 3
        f[:, 1] = g.integers(0, 3, n)  # discrete: its smallest value occurs > 5 times
        f[:repeat_f3, 3] = -5.0  # smallest value exactly 5 times: kept
        f[:repeat_f4, 4] = -5.0  # 6 times: dropped
        return f

    sig = features(50, 5, 6)
    bkg = g.normal(size=(30, 6))
    bkg[:, 3] = -9.0  # background rows would make f3's minimum frequent: they are left out
    train = np.vstack([sig, bkg])
    labels = np.r_[np.ones(50), np.zeros(30)]
    order = g.permutation(80)
    train, labels = train[order], labels[order]
    test_sig = g.normal(size=(20, 6))
    test = np.vstack([test_sig, g.normal(size=(10, 6))])
    test_labels = np.r_[np.ones(20), np.zeros(10)]
    mass = np.full((30, 1), 1000.0)
    names = ",".join(f"f{j}" for j in range(6))
    (root / "hepmass").mkdir(parents=True, exist_ok=True)
    np.savetxt(
        root / "hepmass" / "1000_train.csv",
        np.column_stack([labels, train]),
        delimiter=",",
        header=f"# label,{names}",
        comments="",
    )
    np.savetxt(
        root / "hepmass" / "1000_test.csv",
        np.column_stack([test_labels, test, mass]),
        delimiter=",",
        header=f"# label,{names},mass",
        comments="",
    )
    return train[labels == 1], test_sig


def write_bsds300(root: Path):
    g = np.random.default_rng(5)
    sizes = {"train": 30, "validation": 5, "test": 7}
    parts = {k: g.random((n, 63)).astype(np.float32) for k, n in sizes.items()}
    (root / "BSDS300").mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for k, v in parts.items():
            f.create_dataset(k, data=v)
    return parts


# ----------------------------------------------------------------- the readers
def test_power_shuffles_drops_adds_the_seeded_noise_splits_and_normalises(tmp_path):
    raw = write_power(tmp_path)
    n = raw.shape[0]
    rs = np.random.RandomState(42)  # the release's seed: one generator for shuffle and noise
    order = np.arange(n)
    rs.shuffle(order)  # the same draws as shuffling the rows
    x = raw[order][:, [0, 2, 4, 5, 6, 7]]  # columns 1 and 3 dropped
    voltage = 0.01 * rs.rand(n, 1)  # drawn first, added to the second kept column
    active = 0.001 * rs.rand(n, 1)
    sub = rs.rand(n, 3)
    x = x + np.hstack([active, voltage, sub, np.zeros((n, 1))])
    n_tr, n_va, n_te = _tail(n)
    assert (n_tr, n_va, n_te) == (49, 5, 6)
    tr, va, te = x[:n_tr], x[n_tr : n_tr + n_va], x[n_tr + n_va :]
    mu, sd = x[: n_tr + n_va].mean(0), x[: n_tr + n_va].std(0)  # train + validation, ddof 0
    d = ds.power(tmp_path)
    _close(d.train, (tr - mu) / sd)
    _close(d.val, (va - mu) / sd)
    _close(d.test, (te - mu) / sd)
    assert d.info["name"] == "power" and d.info["dim"] == 6 == ds.DIMS["power"]
    # the time column (last) got no noise: its values are the shuffled raw ones
    np.testing.assert_allclose(d.test.x[:, -1].numpy() * sd[-1] + mu[-1], raw[order][-6:, 7])


def test_miniboone_splits_the_tail_and_normalises_by_train_and_validation(tmp_path):
    raw = write_miniboone(tmp_path)
    n_tr, n_va, n_te = _tail(len(raw))
    assert (n_tr, n_va, n_te) == (41, 4, 5)
    both = raw[: n_tr + n_va]
    mu, sd = both.mean(0), both.std(0)
    d = ds.miniboone(tmp_path)
    _close(d.train, (raw[:n_tr] - mu) / sd)
    _close(d.val, (raw[n_tr : n_tr + n_va] - mu) / sd)
    _close(d.test, (raw[n_tr + n_va :] - mu) / sd)
    x = torch.cat([d.train.x, d.val.x]).double()
    assert torch.allclose(x.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std(0, correction=0), torch.ones(5, dtype=torch.float64), atol=1e-5)


def test_gas_drops_named_and_correlated_columns_and_normalises_before_the_split(tmp_path):
    frame = write_gas(tmp_path)
    # by hand: S1 (the first of a pair above 0.98) goes, then S3, ... S13; S15/S16 (0.9) stay
    kept = [f"S{2 * k + 2}" for k in range(7)] + ["S15", "S16"]
    assert np.corrcoef(frame["S15"], frame["S16"])[0, 1] < 0.98
    x = frame[kept].to_numpy()
    x = (x - x.mean(0)) / x.std(0, ddof=1)  # all rows, pandas' ddof 1
    n_tr, n_va, n_te = _tail(len(x))
    assert (n_tr, n_va, n_te) == (81, 9, 10)
    d = ds.gas(tmp_path)
    _close(d.train, x[:n_tr])
    _close(d.val, x[n_tr : n_tr + n_va])
    _close(d.test, x[n_tr + n_va :])
    assert d.info["dim"] == 9


def test_hepmass_keeps_signal_drops_discrete_features_and_splits_validation_last(tmp_path):
    sig, test_sig = write_hepmass(tmp_path)
    mu, sd = sig.mean(0), sig.std(0, ddof=1)  # signal training rows, before the split
    keep = [0, 2, 3, 5]  # f1 (discrete) and f4 (smallest value 6 times) dropped
    tr = ((sig - mu) / sd)[:, keep]
    te = ((test_sig - mu) / sd)[:, keep]
    n_va = int(0.1 * len(tr))
    d = ds.hepmass(tmp_path)
    assert d.info["dim"] == 4 and n_va == 5
    _close(d.train, tr[:-n_va])
    _close(d.val, tr[-n_va:])
    _close(d.test, te)


def test_bsds300_reads_the_three_splits_as_they_are(tmp_path):
    parts = write_bsds300(tmp_path)
    d = ds.bsds300(tmp_path)
    for split, key in ((d.train, "train"), (d.val, "validation"), (d.test, "test")):
        assert torch.equal(split.x, torch.from_numpy(parts[key]))
    assert d.info["dim"] == 63


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize("name", ds.SUITE)
def test_a_missing_file_is_one_line_naming_it_and_the_release_s_place(tmp_path, name):
    with pytest.raises(FileNotFoundError) as err:
        ds.suite_density(name, tmp_path)
    msg = str(err.value)
    rel = ds.FILES[name][0]
    assert "\n" not in msg and str(tmp_path / rel) in msg and f"data/{rel}" in msg
    assert "zenodo 1161203" in msg
    assert ds.missing_files(name, tmp_path) == [tmp_path / r for r in ds.FILES[name]]


def test_a_missing_file_through_a_config_names_the_task_key(tmp_path):
    raw = tiny(**{"task.dataset": "power", "task.path": "nowhere"})
    cfg = load_config(write_toml(tmp_path / "c.toml", raw))
    with pytest.raises(ConfigError) as err:
        build_task(cfg)
    msg = str(err.value)
    assert msg.startswith("[task].path: ") and "\n" not in msg
    assert str(tmp_path / "nowhere" / "power" / "data.npy") in msg
    assert "puts POWER at data/power/data.npy" in msg


def test_a_suite_set_needs_a_path_and_a_path_needs_a_set_that_reads_one():
    with pytest.raises(ConfigError, match=r"\[task\]\.path: received nothing with dataset 'gas'"):
        config_from_dict(tiny(**{"task.dataset": "gas"}))
    with pytest.raises(ConfigError, match=r"a path only with dataset = 'file' or a set"):
        config_from_dict(tiny(**{"task.path": "x"}))


def test_a_missing_module_names_the_extra(tmp_path, monkeypatch):
    write_bsds300(tmp_path)
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'node_ocp\[suite\]'"):
        ds.bsds300(tmp_path)


def test_too_few_rows_is_an_error_not_an_empty_split(tmp_path):
    write_miniboone(tmp_path, n=10)  # 1 test row, int(0.9) = 0 validation rows
    with pytest.raises(ValueError, match="has 10 rows; accepted: at least 11"):
        ds.miniboone(tmp_path)
    write_miniboone(tmp_path, n=11)
    assert len(ds.miniboone(tmp_path).val) == 1


# ----------------------------------------------------------------- configs and training
def test_a_power_config_trains_two_steps_on_the_release_layout(tmp_path):
    data = tmp_path / "data"
    write_power(data)
    raw = tiny(**{"task.dataset": "power", "task.path": "data", "train.batch_size": 16})
    cfg = load_config(write_toml(tmp_path / "power.toml", raw))  # path read from its folder
    s = train(cfg, tmp_path / "run", RunOptions(max_steps=2, progress=False))
    assert s["dataset"] == "power" and math.isfinite(s["test_metric"])


WRITERS = {
    "power": write_power,
    "gas": write_gas,
    "hepmass": write_hepmass,
    "miniboone": write_miniboone,
    "bsds300": write_bsds300,
}


@pytest.mark.parametrize("name", ds.SUITE)
def test_each_suite_config_loads_and_builds_on_files_in_the_release_layout(tmp_path, name):
    path = ROOT / "configs" / f"cnf_{name}.toml"
    cfg = load_config(path)
    assert cfg.task.kind == "density" and cfg.task.dataset == name and cfg.task.path
    text = path.read_text()
    assert "FFJORD" in text and "Grathwohl" in text  # the published reference values
    WRITERS[name](tmp_path)
    cfg.task.path = str(tmp_path)
    task = build_task(cfg)
    assert task.data.train.x.shape[1] == task.data.info["dim"]
    assert task.blocks


def test_compare_all_leaves_out_suite_configs_without_their_files(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare_all", ROOT / "experiments" / "compare_all.py"
    )
    compare_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_all)
    raw = tiny(**{"task.dataset": "miniboone", "task.path": "data"})
    cfg = write_toml(tmp_path / "mb.toml", raw)
    assert not compare_all._has_its_files(cfg)
    assert "mb: left out: the release's files are not here" in capsys.readouterr().out
    write_miniboone(tmp_path / "data")
    assert compare_all._has_its_files(cfg)
    assert compare_all._has_its_files(ROOT / "configs" / "cnf_moons.toml")
