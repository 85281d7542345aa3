"""Users' own time series from files: the long CSV and .ts readers, the split/standardise/
time-scale builders, their errors (file, line, column), sktime agreement and the CLI."""

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from node_ocp.cli import main
from node_ocp.data import (
    IrregularBatch,
    file_series_classification,
    file_series_forecast,
    read_long_csv,
    read_ts_file,
)
from node_ocp.train.config import ConfigError, load_config
from node_ocp.train.tasks import load_data

ROOT = Path(__file__).resolve().parents[1]
NAN = math.nan


def _write(tmp_path, name, text) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _same(a: torch.Tensor, b) -> bool:
    b = torch.as_tensor(b, dtype=a.dtype)
    return (
        a.shape == b.shape
        and bool(torch.equal(torch.isnan(a), torch.isnan(b)))
        and bool(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))
    )


HAND = """Series,TIME,x,y,label
b,5.0,1.0,2.0,1
a,0.5,,7.0,0
a,0.25,3.0,nan,0

b,4.0,-1.5,0.5,1
a,1.0,,,0
a,2.0,4.5,NaN,0
"""


def test_long_csv_by_hand(tmp_path):
    s = read_long_csv(_write(tmp_path, "hand.csv", HAND))
    assert s.channels == ["x", "y"] and s.ids == ["b", "a"] and s.labels == ["1", "0"]
    assert s.lines == [2, 3]  # the first line of each series (rows need not be contiguous)
    # sorted by time; the row at a/1.0 observes nothing and adds no time point
    assert _same(s.times[0], [4.0, 5.0]) and _same(s.values[0], [[-1.5, 0.5], [1.0, 2.0]])
    assert _same(s.times[1], [0.25, 0.5, 2.0])
    assert _same(s.values[1], [[3.0, NAN], [NAN, 7.0], [4.5, NAN]])


def _series_csv(tmp_path, n=10, seed=0, name="s.csv"):
    """n series of random irregular times (offsets, spans) and 2 channels, rows shuffled."""
    rng = np.random.default_rng(seed)
    truth, rows = {}, []
    for k in range(n):
        length = int(rng.integers(3, 8))
        t = np.sort(rng.choice(np.arange(40), size=length, replace=False)) * 0.5 + 3 * k
        v = rng.normal(size=(length, 2)) * [1.0, 10.0] + [0.0, 5.0]
        v[rng.random(v.shape) < 0.2] = np.nan
        v[np.isnan(v).all(1), 0] = 1.0
        label = ["cat", "dog", "ant"][k % 3]
        truth[f"id{k}"] = (t, v, label)
        rows += [f"id{k},{float(ti)!r},{_cell(a)},{_cell(b)},{label}" for ti, (a, b) in zip(t, v)]
    order = rng.permutation(len(rows))
    text = "series,time,c0,c1,label\n" + "\n".join(rows[i] for i in order) + "\n"
    return _write(tmp_path, name, text), truth


def _cell(v):
    return "" if np.isnan(v) else repr(float(v))


def test_round_trip_long_csv_and_ts_with_time_stamps(tmp_path):
    path, truth = _series_csv(tmp_path, n=7)
    s = read_long_csv(path)
    assert sorted(s.ids) == sorted(truth)
    lines = ["@problemName trip", "@timeStamps true", "@univariate false", "@dimensions 2"]
    lines += ["@equalLength false", "@classLabel true ant cat dog", "# a comment", "@data"]
    for k, sid in enumerate(s.ids):
        t, v, label = truth[sid]
        assert _same(s.times[k], t) and _same(s.values[k], v) and s.labels[k] == label
        dims = [
            ",".join(
                f"({ti!r},{'?' if np.isnan(x) else repr(float(x))})"
                for ti, x in zip(t.tolist(), v[:, c])
            )
            for c in range(2)
        ]
        lines.append(":".join(dims) + f":{label}")
    ts = read_ts_file(_write(tmp_path, "trip.ts", "\n".join(lines) + "\n"))
    assert ts.name == "trip" and ts.channels == ["dim_0", "dim_1"] and ts.labels == s.labels
    for k in range(len(s)):
        assert _same(ts.times[k], s.times[k]) and _same(ts.values[k], s.values[k])


def test_classification_splits_standardise_and_scale_times(tmp_path):
    path, truth = _series_csv(tmp_path, n=10)
    data = file_series_classification(path, drop=0.0, seed=3, dtype=torch.float64)
    ids = data.info["series"]
    assert [len(ids[k]) for k in ("train", "val", "test")] == [8, 1, 1]
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == sorted(truth)
    assert data.info["labels"] == ["ant", "cat", "dog"] and data.info["classes"] == 2 + 1
    span = max(t[-1] - t[0] for t, _, _ in truth.values())
    assert data.info["time_scale"] == pytest.approx(span, abs=1e-12)
    fit = np.concatenate([truth[i][1] for i in ids["train"]])
    mean, std = np.nanmean(fit, 0), np.nanstd(fit, 0)
    assert torch.allclose(data.info["mean"], torch.tensor(mean), atol=1e-12)
    assert torch.allclose(data.info["std"], torch.tensor(std), atol=1e-12)
    for split, key in ((data.train, "train"), (data.val, "val"), (data.test, "test")):
        assert isinstance(split.x, IrregularBatch) and split.y.dtype == torch.long
        for b, sid in enumerate(ids[key]):
            t, v, label = truth[sid]
            n = len(t)
            assert torch.allclose(split.x.times[b, :n], torch.tensor((t - t[0]) / span))
            assert not split.x.mask[b, n:].any()
            observed = ~np.isnan(v)
            assert torch.equal(split.x.mask[b, :n], torch.tensor(observed))
            want = (v - mean) / std
            got = split.x.values[b, :n].numpy()
            assert np.allclose(got[observed], want[observed], atol=1e-12)
            assert int(split.y[b]) == ["ant", "cat", "dog"].index(label)
    assert float(data.train.x.times.max()) <= 1.0 and float(data.train.x.times.min()) == 0.0
    again = file_series_classification(path, seed=3, dtype=torch.float64)
    assert again.info["series"] == ids and torch.equal(again.train.x.values, data.train.x.values)
    other = file_series_classification(path, seed=4, dtype=torch.float64)
    assert other.info["series"] != ids


def test_drop_keeps_a_seeded_subset_with_at_least_one_point(tmp_path):
    path, truth = _series_csv(tmp_path, n=30)
    full = file_series_classification(path, dtype=torch.float64)
    dropped = file_series_classification(path, drop=0.9, seed=0, dtype=torch.float64)
    assert dropped.info["series"] == full.info["series"]
    kept = dropped.train.x.valid.sum(1)
    assert bool((kept >= 1).all())
    assert kept.sum() < 0.3 * full.train.x.valid.sum()
    for b in range(len(full.train)):
        whole = full.train.x.times[b][full.train.x.valid[b]].tolist()
        some = dropped.train.x.times[b][dropped.train.x.valid[b]].tolist()
        assert set(some) <= set(whole)
    again = file_series_classification(path, drop=0.9, seed=0, dtype=torch.float64)
    assert torch.equal(again.train.x.mask, dropped.train.x.mask)


def test_forecast_past_and_future_by_hand(tmp_path):
    text = "series,time,v\n" + "\n".join(
        f"{sid},{t},{v}"
        for sid, pts in {
            "a": [(0, 1), (1, 2), (2, 3), (4, 4)],
            "b": [(10, 5), (12, 6)],
            "c": [(3, 7), (5, 8), (6, 9)],
        }.items()
        for t, v in pts
    )
    path = _write(tmp_path, "f.csv", text + "\n")
    data = file_series_forecast(path, observe=0.5, seed=0, dtype=torch.float64)
    raw = {"a": ([0, 1, 2, 4], [1, 2, 3, 4]), "b": ([0, 2], [5, 6]), "c": ([0, 2, 3], [7, 8, 9])}
    # the time scale is the longest span of the training series only
    scale = max(raw[sid][0][-1] for sid in data.info["series"]["train"])
    assert data.info["time_scale"] == scale and data.info["observe"] == 0.5
    mean, std = data.info["mean"], data.info["std"]
    for split, key in ((data.train, "train"), (data.val, "val"), (data.test, "test")):
        for b, sid in enumerate(data.info["series"][key]):
            t, v = (torch.tensor(x, dtype=torch.float64) for x in raw[sid])
            cut = 0.5 * t[-1]  # the series' own span, in file units
            past, future = t < cut, t >= cut
            px, fy = split.x, split.y
            assert torch.allclose(px.times[b][px.valid[b]], t[past] / scale)
            assert torch.allclose(fy.times[b][fy.valid[b]], t[future] / scale)
            assert torch.allclose(fy.values[b][fy.valid[b]][:, 0], (v[future] - mean) / std)
    one = _write(tmp_path, "g.csv", text + "\nd,1.0,3.0\n")
    with pytest.raises(ValueError, match=r"^path: g\.csv line 11: series 'd' .* none before"):
        file_series_forecast(one)


def _sktime_dir():
    sktime = pytest.importorskip("sktime")
    return Path(sktime.__file__).parent / "datasets" / "data"


@pytest.mark.parametrize(
    "name", ["ItalyPowerDemand/ItalyPowerDemand_TRAIN.ts", "JapaneseVowels/JapaneseVowels_TRAIN.ts"]
)
def test_ts_reader_agrees_with_sktime(name):
    path = _sktime_dir() / name
    from sktime.datasets import load_from_tsfile

    frame, y = load_from_tsfile(str(path), return_data_type="nested_univ")
    s = read_ts_file(path)
    assert len(s) == len(frame) and len(s.channels) == frame.shape[1]
    assert s.labels == [str(v) for v in y]
    lengths = set()
    for i in range(len(frame)):
        for c in range(frame.shape[1]):
            col = np.asarray(frame.iloc[i, c], dtype=np.float64)
            lengths.add(len(col))
            assert np.array_equal(s.values[i][:, c].numpy(), col)
            assert np.array_equal(s.times[i].numpy(), np.arange(len(col), dtype=np.float64))
    if "Japanese" in name:
        assert len(s.channels) == 12 and len(lengths) > 5  # multivariate, variable length


def test_ts_train_file_brings_its_test_sibling(tmp_path):
    src = _sktime_dir() / "ItalyPowerDemand"
    shutil.copy(src / "ItalyPowerDemand_TRAIN.ts", tmp_path / "Power_TRAIN.ts")
    alone = file_series_classification(tmp_path / "Power_TRAIN.ts")
    assert alone.info["test_file"] is None and [len(alone.train), len(alone.val)] == [53, 7]
    shutil.copy(src / "ItalyPowerDemand_TEST.ts", tmp_path / "Power_TEST.ts")
    both = file_series_classification(tmp_path / "Power_TRAIN.ts")
    assert both.info["test_file"] == "Power_TEST.ts" and both.info["labels"] == [1, 2]
    assert [len(both.train), len(both.val), len(both.test)] == [54, 13, 1029]
    test = read_ts_file(tmp_path / "Power_TEST.ts")
    want = torch.tensor([int(v) - 1 for v in test.labels])
    assert torch.equal(both.test.y, want)
    assert both.info["time_scale"] == 23.0 and float(both.test.x.times.max()) == 1.0


CSV_HEAD = "series,time,a,b,label\n"


@pytest.mark.parametrize(
    "body, where",
    [
        ("s,0,1,2,x\ns,zz,1,2,x\n", "line 3 column 2 ('time'): cannot read 'zz'"),
        ("s,0,1,2,x\ns,inf,1,2,x\n", "line 3 column 2 ('time'): cannot read 'inf'"),
        ("s,0,1,2,x\ns,1,1,oops,x\n", "line 3 column 4 ('b'): cannot read 'oops'"),
        ("s,0,1,2,x\ns,1,-inf,2,x\n", "line 3 column 3 ('a'): cannot read '-inf'"),
        (
            "s,0,1,2,x\nt,0,1,2,x\ns,0.0,1,2,x\n",
            "line 4 column 2 ('time'): time 0.0 of series 's' again (also line 2)",
        ),
        ("s,0,1,2,x\ns,1,1,2,y\n", "line 3 column 5 ('label'): label 'y' for series 's'"),
        (
            "t,0,1,2,x\ns,0,,,x\ns,1,nan,,x\n",
            "line 3 columns 3 ('a'), 4 ('b'): series 's' has no observed",
        ),
        ("s,0,1,2,x\ns,1,2,x\n", "line 3 has 4 columns, the header (line 1) 5"),
        ("s,0,1,2,x\n,1,2,3,x\n", "line 3 column 1 ('series'): an empty series id"),
        ("s,0,1,2,x\ns,1,2,3,\n", "line 3 column 5 ('label'): an empty label"),
    ],
)
def test_long_csv_errors_name_file_line_and_column(tmp_path, body, where):
    path = _write(tmp_path, "bad.csv", CSV_HEAD + body)
    with pytest.raises(ValueError) as err:
        read_long_csv(path)
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"path: bad.csv {where}") and "accepted:" in first, first


@pytest.mark.parametrize(
    "text, where",
    [
        ("id,time,a\n1,0,1\n", "line 1: no column named 'series'"),
        ("\nseries,when,a\n1,0,1\n", "line 2: no column named 'time'"),
        ("series,time,label\n1,0,x\n", "line 1: no channel column"),
        ("series,time,a,A\n1,0,1,2\n", "line 1 column 4: column name 'A' again (column 3)"),
        ("series,time,,a\n1,0,1,2\n", "line 1 column 3: an empty column name"),
    ],
)
def test_long_csv_header_errors(tmp_path, text, where):
    with pytest.raises(ValueError, match=r"^path: head\.csv " + re.escape(where)):
        read_long_csv(_write(tmp_path, "head.csv", text))


TS_HEAD = "@problemName p\n@univariate false\n@dimensions 2\n@equalLength true\n@seriesLength 3\n"


@pytest.mark.parametrize(
    "text, where",
    [
        (
            "@problemName p\n@color blue\n@data\n",
            "line 2: unknown tag '@color'; accepted: @problemName",
        ),
        (
            "@targetLabel true\n@data\n1,2:3\n",
            "line 1: @targetLabel true (regression targets) is not supported",
        ),
        (
            "@timeStamps maybe\n@data\n",
            "line 1: @timeStamps maybe; accepted: @timeStamps true or false",
        ),
        ("1,2,3\n", "line 1: '1,2,3' before @data"),
        (
            TS_HEAD + "@classLabel true u v\n@data\n1,2,3:4,5,6:u\n1,2,3:u\n",
            "line 9: 1 dimensions (@dimensions 2)",
        ),
        (
            TS_HEAD + "@classLabel true u v\n@data\n1,2,3:4,5,6:w\n",
            "line 8: class label 'w'; accepted: one of the @classLabel labels (line 6): u, v",
        ),
        (
            TS_HEAD + "@classLabel false\n@data\n1,2,3:4,x,6\n",
            "line 8 dimension 2 value 2: cannot read 'x'",
        ),
        (
            TS_HEAD + "@classLabel false\n@data\n1,2,3:4,5\n",
            "line 8 dimension 2: 2 values; accepted: 3 (@equalLength true, @seriesLength 3 "
            "at line 5)",
        ),
        (
            TS_HEAD + "@classLabel false\n@data\n?,?,?:NaN,?,?\n",
            "line 8: a series with no observed value",
        ),
        ("@timeStamps true\n@data\n(0,1),(0,2)\n", "line 3 dimension 1 pair 2: time 0.0 again"),
        (
            "@timeStamps true\n@data\n(0,1);(1,2)\n",
            "line 3 dimension 1: '(0,1);(1,2)'; accepted: (time,value) pairs",
        ),
    ],
)
def test_ts_errors_name_file_and_line(tmp_path, text, where):
    with pytest.raises(ValueError) as err:
        read_ts_file(_write(tmp_path, "bad.ts", text))
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"path: bad.ts {where}"), first


def test_ts_tecator_regression_targets_are_refused():
    path = _sktime_dir() / "Tecator" / "Tecator_TRAIN.ts"
    with pytest.raises(ValueError, match=r"^path: Tecator_TRAIN\.ts line 16: @targetLabel true"):
        read_ts_file(path)


def test_builder_errors(tmp_path):
    two = _write(tmp_path, "two.csv", "series,time,a,label\n1,0,1,x\n2,0,2,y\n")
    with pytest.raises(ValueError, match=r"^path: two\.csv holds 2 series; accepted: >= 3"):
        file_series_classification(two)
    nolabel = _write(tmp_path, "nl.csv", "series,time,a\n1,0,1\n2,0,2\n3,0,3\n")
    with pytest.raises(ValueError, match=r"^path: nl\.csv has no 'label' column"):
        file_series_classification(nolabel)
    with pytest.raises(ValueError, match=r"^drop: received 1\.0"):
        file_series_classification(nolabel, drop=1.0)
    one = _write(tmp_path, "one.csv", "series,time,a,label\n1,0,1,x\n2,0,2,x\n3,0,3,x\n")
    with pytest.raises(ValueError, match=r"^path: one\.csv holds one class only"):
        file_series_classification(one)


def _config(tmp_path, task: str, model: str = "odernn", name="c.toml") -> Path:
    text = f"""[task]
{task}

[model]
kind = "{model}"
width = 4
hidden = [8]

[solver]
method = "rk4"

[train]
optimizer = "adam"
steps = 2
batch_size = 8
eval_every = 1
checkpoint_every = 2

[optimizers.adam]
kind = "adam"
lr = 0.01
"""
    return _write(tmp_path, name, text)


def test_own_series_config_and_forecast_on_the_same_file():
    cfg = load_config(ROOT / "configs" / "own_series.toml")
    data = load_data(cfg)
    assert (len(data.train), len(data.val), len(data.test)) == (48, 6, 6)
    assert data.info["channels"] == 2 and data.info["labels"] == ["shaky", "steady"]
    assert data.info["channel_names"] == ["accel", "gyro"]
    assert data.train.x.mask.float().mean() < 1.0  # the file has empty cells
    assert (ROOT / "configs" / "data" / "sensors.csv").stat().st_size < 100_000


def test_cli_trains_on_own_series(tmp_path, capsys):
    path, _ = _series_csv(tmp_path, n=12, name="mine.csv")
    cls = _config(
        tmp_path, 'kind = "classification"\ndataset = "file"\npath = "mine.csv"', model="cde"
    )
    assert main(["train", str(cls), "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert (tmp_path / "c" / "summary.json").is_file()
    sensors = ROOT / "configs" / "data" / "sensors.csv"
    fc = _config(
        tmp_path,
        f'kind = "forecast"\ndataset = "file"\npath = "{sensors}"\nobserve = 0.6\ndrop = 0.3',
        name="f.toml",
    )
    assert main(["train", str(fc), "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    assert "test mse" in capsys.readouterr().out


def test_cli_bad_series_file_is_one_error_line(tmp_path, capsys):
    _write(tmp_path, "bad.csv", "series,time,a,label\n1,0,1,x\n1,zero,2,x\n")
    cfg = _config(tmp_path, 'kind = "forecast"\ndataset = "file"\npath = "bad.csv"')
    assert main(["train", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("node-ocp: error: [task].path: bad.csv line 3 column 2 ('time')")
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.parametrize(
    "task, key",
    [
        ('kind = "forecast"\ndataset = "file"\npath = "x.csv"\nformat = "table"', "[task].format"),
        ('kind = "density"\ndataset = "file"\npath = "x.csv"\nformat = "long"', "[task].format"),
        ('kind = "forecast"\ndataset = "spiral"\nformat = "long"', "[task].format"),
        ('kind = "forecast"\ndataset = "file"\npath = "x.csv"\nformat = "csv"', "[task].format"),
    ],
)
def test_config_format_key(tmp_path, task, key):
    with pytest.raises(ConfigError, match=r"^" + re.escape(key) + r": received"):
        load_config(_config(tmp_path, task))


def test_columns_name_the_files_own_series_time_and_label(tmp_path):
    """A user's header (patient, hour, outcome): ``columns`` maps the roles; the data read
    is the same as the file with the standard names; a wrong name is one line."""
    renamed = HAND.replace("Series,TIME,x,y,label", "patient,hour,x,y,outcome")
    a = read_long_csv(_write(tmp_path, "std.csv", HAND))
    b = read_long_csv(
        _write(tmp_path, "own.csv", renamed),
        columns={"series": "patient", "time": "hour", "label": "outcome"},
    )
    assert (b.ids, b.labels, b.channels) == (a.ids, a.labels, a.channels)
    assert all(_same(x, y) for x, y in zip(a.times + a.values, b.times + b.values))
    with pytest.raises(ValueError, match=r"^columns: label = 'result' is not a column of own"):
        read_long_csv(
            tmp_path / "own.csv", columns={"series": "patient", "time": "hour", "label": "result"}
        )
    with pytest.raises(ValueError, match=r"no column named 'series'.*\[task\]\.columns"):
        read_long_csv(tmp_path / "own.csv")
    # through a config: the key is [task].columns
    path, _ = _series_csv(tmp_path, n=6, name="big.csv")
    path.write_text(path.read_text().replace("series,time,c0,c1,label", "patient,hour,c0,c1,y"))
    task = 'kind = "classification"\ndataset = "file"\npath = "big.csv"\n'
    cfg = _config(
        tmp_path,
        task + 'columns = { series = "patient", time = "hour", label = "y" }',
        name="c1.toml",
    )
    assert load_data(load_config(cfg)).info["labels"] == ["ant", "cat", "dog"]
    cfg = _config(
        tmp_path, task + 'columns = { series = "patient", time = "hour" }', name="c2.toml"
    )
    # without label = "y" the column y is a channel, and its class names are not numbers
    with pytest.raises(ConfigError, match=r"^\[task\]\.path: big.csv line 2 column 5 \('y'\)"):
        load_data(load_config(cfg))
    cfg = _config(tmp_path, task + 'columns = { patient = "series" }', name="b.toml")
    with pytest.raises(ConfigError, match=r"^\[task\]\.columns: received patient = 'series'"):
        load_config(cfg)


def test_review_fixes_bom_shared_column_univariate_and_misplaced_keys(tmp_path):
    # a UTF-8 BOM (Excel's "CSV UTF-8") is not part of the first column's name
    bom = _write(tmp_path, "bom.csv", "\ufeff" + HAND)
    assert read_long_csv(bom).ids == read_long_csv(_write(tmp_path, "h.csv", HAND)).ids
    # two roles on one column are refused, naming both
    with pytest.raises(ValueError, match=r"^columns: series and time both name column 1"):
        read_long_csv(tmp_path / "h.csv", columns={"series": "Series", "time": "series"})
    # @univariate true is named as what set the dimensions
    ts = "@problemName u\n@univariate true\n@classLabel true a\n@data\n1,2:3,4:a\n"
    with pytest.raises(ValueError, match=r"line 5: 2 dimensions \(@univariate true\)"):
        read_ts_file(_write(tmp_path, "u.ts", ts))
    # columns for a .ts file, format = 'images' for a CSV table: one line, not ignored
    _series_csv(tmp_path, n=6, name="s.csv")
    task = 'kind = "classification"\ndataset = "file"\npath = "s.csv"\n'
    cfg = _config(tmp_path, task + 'format = "ts"\ncolumns = { series = "id" }', name="a.toml")
    with pytest.raises(ConfigError, match=r"^\[task\]\.columns: received .* for a ts file"):
        load_data(load_config(cfg))
    cfg = _config(tmp_path, task + 'format = "images"', model="image", name="b.toml")
    with pytest.raises(ConfigError, match=r"^\[task\]\.path: s.csv is not an image file"):
        load_data(load_config(cfg))
