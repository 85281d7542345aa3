"""The standard tabular density suite read from the user's copy of the release files.

POWER, GAS, HEPMASS, MINIBOONE and BSDS300 as prepared for Papamakarios, Pavlakou and Murray
(2017), "Masked Autoregressive Flow for Density Estimation" (MAF), and used since by FFJORD
(Grathwohl et al., 2019) and most CNF papers. The release (zenodo record 1161203,
``data.tar.gz``) unpacks to a ``data/`` folder::

    data/power/data.npy                 POWER
    data/gas/ethylene_CO.pickle         GAS (a pandas DataFrame)
    data/hepmass/1000_train.csv         HEPMASS (with 1000_test.csv)
    data/miniboone/data.npy             MINIBOONE
    data/BSDS300/BSDS300.hdf5           BSDS300

Each reader takes that folder (``path``) and returns float32 ``(N, D)`` splits made with
the same steps, in the same order, as the release's own loaders in the MAF repository
(github.com/gpapamak/maf, ``datasets/<name>.py``; FFJORD's ``datasets/`` are copies of
them): the same dropped columns, noise (with the same seed), feature removal, split sizes
and normalisation statistics. Each docstring names the reference function behind every
step. Nothing is shuffled or split with this package's own seed: the release's splits are
the published ones.

=========  ===  =========  ==========  ==========  =====================================
set        D    train      validation  test        reference file
=========  ===  =========  ==========  ==========  =====================================
POWER      6    1,659,917  184,435     204,928     power/data.npy
GAS        8    852,174    94,685      105,206     gas/ethylene_CO.pickle
HEPMASS    21   315,123    35,013      174,987     hepmass/1000_{train,test}.csv
MINIBOONE  43   29,556     3,284       3,648       miniboone/data.npy
BSDS300    63   1,000,000  50,000      250,000     BSDS300/BSDS300.hdf5
=========  ===  =========  ==========  ==========  =====================================

GAS and HEPMASS need pandas and BSDS300 needs h5py (``pip install 'node_ocp[suite]'``);
POWER and MINIBOONE need only numpy. A missing file is one error line naming the file
expected and where the release puts it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .._errors import bad_value
from .bundled import _require
from .splits import Split, TaskData

#: the set names accepted by ``[task] dataset`` (with ``path`` the release's data folder)
SUITE = ("power", "gas", "hepmass", "miniboone", "bsds300")

#: each set's files, relative to the release's ``data/`` folder
FILES = {
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}

#: dimensions and (train, validation, test) sizes the release's files give
DIMS = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}
SIZES = {
    "power": (1_659_917, 184_435, 204_928),
    "gas": (852_174, 94_685, 105_206),
    "hepmass": (315_123, 35_013, 174_987),
    "miniboone": (29_556, 3_284, 3_648),
    "bsds300": (1_000_000, 50_000, 250_000),
}

RELEASE = "the standard release (Papamakarios et al. 2017, zenodo 1161203)"


def suite_density(name: str, path) -> TaskData:
    """The suite set ``name`` (one of :data:`SUITE`) from the release folder ``path``."""
    if name not in SUITE:
        raise bad_value("name", name, "one of " + ", ".join(map(repr, SUITE)))
    return READERS[name](path)


def missing_files(name: str, path) -> list[Path]:
    """The files of set ``name`` that are not under the folder ``path``."""
    return [Path(path) / rel for rel in FILES[name] if not (Path(path) / rel).is_file()]


# ----------------------------------------------------------------- helpers
def _file(path, name: str, index: int = 0) -> Path:
    """``path / FILES[name][index]``, or a one-line error naming it and the release's place."""
    rel = FILES[name][index]
    p = Path(path).expanduser() / rel
    if not p.is_file():
        raise FileNotFoundError(
            f"path: {p} not found; {RELEASE} puts {name.upper()} at data/{rel} "
            "(path is that data/ folder)"
        )
    return p


def _table(p: Path, data, name: str, columns: int | None = None) -> np.ndarray:
    """``data`` as a 2-D array (with ``columns`` columns when given), or a one-line error."""
    arr = np.asarray(data)
    if arr.ndim != 2 or (columns is not None and arr.shape[1] != columns):
        want = f"(N, {columns})" if columns is not None else "(N, D)"
        raise ValueError(
            f"path: {p.name} holds an array of shape {arr.shape}; accepted: {want}, the "
            f"{name.upper()} table of {RELEASE}"
        )
    return arr


def _tail_split(data: np.ndarray, p: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The release's unshuffled split: the last ``int(0.1 N)`` rows are the test split, then
    the last ``int(0.1 N')`` of the ``N'`` rows left are the validation split."""
    n_test = int(0.1 * data.shape[0])
    n_val = int(0.1 * (data.shape[0] - n_test))
    if n_val == 0:  # (a slice [-0:] would take every row)
        raise ValueError(
            f"path: {p.name} has {data.shape[0]} rows; accepted: at least 11, so that the "
            "validation and test splits (10% each) are not empty"
        )
    rest, test = data[:-n_test], data[-n_test:]
    return rest[:-n_val], rest[-n_val:], test


def _normalise(train, val, test, mean, std):
    return tuple((x - mean) / std for x in (train, val, test))


def _data(name: str, train, val, test, mean=None, std=None) -> TaskData:
    def f32(x):
        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))

    info = {"name": name, "dim": int(np.shape(train)[1]), "source": "release files"}
    if mean is not None:
        info["mean"], info["std"] = f32(np.reshape(mean, (1, -1))), f32(np.reshape(std, (1, -1)))
    return TaskData(Split(f32(train)), Split(f32(val)), Split(f32(test)), info)


# ----------------------------------------------------------------- the five sets
def power(path) -> TaskData:
    """POWER (UCI "Individual household electric power consumption"): D = 6, splits
    1,659,917 / 184,435 / 204,928 from the release's 2,049,280 rows of 8 columns.

    Steps (MAF ``datasets/power.py``):

    1. read ``power/data.npy`` (``load_data``), an ``(N, 8)`` array;
    2. shuffle its rows with ``numpy.random.RandomState(42).shuffle``
       (``load_data_split_with_noise``; the same generator then draws the noise);
    3. drop columns 3 and 1 (global intensity, global reactive power), keeping 0, 2, 4, 5,
       6, 7 (``load_data_split_with_noise``);
    4. add uniform noise drawn, in this order, from the same generator: ``0.01 * U(N, 1)``
       for the voltage column, ``0.001 * U(N, 1)`` for the global-active-power column and
       ``U(N, 3)`` for the three sub-metering columns; none for the time column
       (``load_data_split_with_noise``);
    5. the last ``int(0.1 N)`` rows are the test split, the last ``int(0.1 N')`` of the rest
       the validation split (``load_data_split_with_noise``);
    6. normalise every split by the mean and standard deviation (``ddof = 0``) of training
       and validation rows together (``load_data_normalised``).
    """
    p = _file(path, "power")
    data = _table(p, np.load(p), "power", columns=8)
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = data.shape[0]
    data = data[:, [0, 2, 4, 5, 6, 7]]
    voltage = 0.01 * rng.rand(n, 1)
    active_power = 0.001 * rng.rand(n, 1)
    sub_metering = rng.rand(n, 3)
    data = data + np.hstack((active_power, voltage, sub_metering, np.zeros((n, 1))))
    train, val, test = _tail_split(data, p)
    both = np.vstack((train, val))
    mean, std = both.mean(axis=0), both.std(axis=0)
    return _data("power", *_normalise(train, val, test, mean, std), mean, std)


def gas(path) -> TaskData:
    """GAS (UCI "Gas sensor array under dynamic gas mixtures", ethylene and CO): D = 8,
    splits 852,174 / 94,685 / 105,206 from the release's 1,052,065 rows.

    Steps (MAF ``datasets/gas.py``):

    1. read the pandas DataFrame ``gas/ethylene_CO.pickle`` and drop its columns named
       ``Meth``, ``Eth`` and ``Time`` (``load_data``), leaving the 16 sensor readings;
    2. while some column has a Pearson correlation above 0.98 with another column, drop
       (by name) the first such column and recompute the correlations
       (``load_data_and_clean``, ``get_correlation_numbers``); 8 columns remain;
    3. normalise by the mean and standard deviation (``ddof = 1``, pandas' default) of all
       rows, test rows included, as the release does (``load_data_and_clean``);
    4. no shuffling: the last ``int(0.1 N)`` rows are the test split, the last
       ``int(0.1 N')`` of the rest the validation split (``load_data_and_clean_and_split``).

    The release's pickle was written by a 2017 pandas; a pandas that cannot read it is a
    one-line error (the francois-rozet/uci-datasets fork, which the MAF README recommends
    since July 2024, asks for pandas < 2.0 for this file).
    """
    pd = _require("pandas", "suite")
    p = _file(path, "gas")
    try:
        frame = pd.read_pickle(p)
    except Exception as exc:  # unpickling raises many types (pandas or pickle internals)
        raise ValueError(
            f"path: {p} cannot be read by pandas {pd.__version__} ({type(exc).__name__}); "
            "accepted: the release's DataFrame pickle, which older pandas read (< 2.0)"
        ) from None
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"path: {p.name} holds a {type(frame).__name__}; accepted: a DataFrame")
    absent = [c for c in ("Meth", "Eth", "Time") if c not in frame.columns]
    if absent:
        raise ValueError(
            f"path: {p.name} has no column {', '.join(map(repr, absent))}; accepted: the "
            "release's GAS DataFrame (columns Time, Meth, Eth and 16 sensors)"
        )
    frame = frame.drop(columns=["Meth", "Eth", "Time"])

    def correlated(f) -> np.ndarray:  # per column: how many columns (itself too) exceed 0.98
        return (f.corr() > 0.98).to_numpy().sum(axis=1)

    counts = correlated(frame)
    while np.any(counts > 1):
        frame = frame.drop(columns=frame.columns[np.flatnonzero(counts > 1)[0]])
        counts = correlated(frame)
    mean, std = frame.mean().to_numpy(), frame.std().to_numpy()
    data = (frame.to_numpy() - mean) / std
    return _data("gas", *_tail_split(data, p), mean, std)


def hepmass(path) -> TaskData:
    """HEPMASS (UCI, the ``1000`` set: signal particle of mass 1000): D = 21, splits
    315,123 / 35,013 / 174,987, the signal events of the release's train and test CSVs.

    Steps (MAF ``datasets/hepmass.py``):

    1. read ``hepmass/1000_train.csv`` and ``hepmass/1000_test.csv`` with their header row
       (``load_data``, pandas ``read_csv(index_col=False)``);
    2. keep the rows whose first column (the class label) is 1, the signal, and drop that
       column; drop the test file's last column too, which the training file does not
       have (``load_data_no_discrete``);
    3. normalise both by the training rows' mean and standard deviation (``ddof = 1``,
       pandas' default), before the validation rows are set apart
       (``load_data_no_discrete_normalised``);
    4. drop every feature whose smallest value occurs more than 5 times in the normalised
       training rows, the discrete ones (``load_data_no_discrete_normalised_as_array``);
    5. the last ``int(0.1 N)`` training rows are the validation split, unshuffled
       (``load_data_no_discrete_normalised_as_array``).

    The columns are matched by position (the release matches them by header name; its two
    files name them alike once the test file's extra column is gone).
    """
    pd = _require("pandas", "suite")
    frames = []
    for index in (0, 1):
        p = _file(path, "hepmass", index)
        frame = pd.read_csv(p, index_col=False)
        label = frame.iloc[:, 0]
        frame = frame.loc[label == 1].iloc[:, 1:]
        frames.append((p, frame.iloc[:, :-1] if index == 1 else frame))
    (p_train, train), (p_test, test) = frames
    if train.shape[1] != test.shape[1] or train.shape[0] < 10 or test.shape[0] < 1:
        raise ValueError(
            f"path: {p_train.name} gives {train.shape[0]} signal rows of {train.shape[1]} "
            f"features and {p_test.name} {test.shape[0]} of {test.shape[1]} (its last column "
            "dropped); accepted: the release's files (label first, the test file with one "
            "column more), 10 or more training rows"
        )
    mean, std = train.mean().to_numpy(), train.std().to_numpy()
    train = (train.to_numpy() - mean) / std
    test = (test.to_numpy() - mean) / std
    keep = [j for j in range(train.shape[1]) if np.sum(train[:, j] == train[:, j].min()) <= 5]
    train, test = train[:, keep], test[:, keep]
    n_val = int(0.1 * train.shape[0])
    return _data("hepmass", train[:-n_val], train[-n_val:], test, mean[keep], std[keep])


def miniboone(path) -> TaskData:
    """MINIBOONE (UCI "MiniBooNE particle identification"): D = 43, splits 29,556 / 3,284
    / 3,648 from the release's 36,488 rows.

    The release's ``data.npy`` is already cleaned (outliers with a first feature below
    -100 and the discrete features removed, as recorded in the comment of ``load_data``);
    the steps left (MAF ``datasets/miniboone.py``):

    1. read ``miniboone/data.npy`` (``load_data``);
    2. no shuffling: the last ``int(0.1 N)`` rows are the test split, the last
       ``int(0.1 N')`` of the rest the validation split (``load_data``);
    3. normalise by the mean and standard deviation (``ddof = 0``) of training and
       validation rows together (``load_data_normalised``).
    """
    p = _file(path, "miniboone")
    train, val, test = _tail_split(_table(p, np.load(p), "miniboone"), p)
    both = np.vstack((train, val))
    mean, std = both.mean(axis=0), both.std(axis=0)
    return _data("miniboone", *_normalise(train, val, test, mean, std), mean, std)


def bsds300(path) -> TaskData:
    """BSDS300 (8x8 patches of the Berkeley segmentation images, the bottom-right pixel left
    out): D = 63, splits 1,000,000 / 50,000 / 250,000.

    The release's HDF5 file holds the preprocessed splits; they are read as they are, with
    no further step (MAF ``datasets/bsds300.py``, ``BSDS300.__init__``): the datasets
    ``train``, ``validation`` and ``test`` of ``BSDS300/BSDS300.hdf5``.
    """
    h5py = _require("h5py", "suite")
    p = _file(path, "bsds300")
    with h5py.File(p, "r") as f:
        absent = [k for k in ("train", "validation", "test") if k not in f]
        if absent:
            raise ValueError(
                f"path: {p.name} has no dataset {', '.join(map(repr, absent))}; accepted: "
                "the release's BSDS300 file (datasets train, validation, test)"
            )
        parts = [_table(p, f[k][:], "bsds300") for k in ("train", "validation", "test")]
    if len({x.shape[1] for x in parts}) != 1:
        raise ValueError(
            f"path: {p.name}'s splits have {[x.shape[1] for x in parts]} columns; accepted: "
            "the same number in train, validation and test"
        )
    return _data("bsds300", *parts)


READERS: dict[str, Callable[[object], TaskData]] = {
    "power": power,
    "gas": gas,
    "hepmass": hepmass,
    "miniboone": miniboone,
    "bsds300": bsds300,
}
