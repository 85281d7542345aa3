"""Loaders: documented shapes and dtypes, deterministic disjoint splits, user-file errors."""

import gzip
import struct

import numpy as np
import pytest
import torch

from node_ocp.data import (
    TABULAR,
    digits_images,
    load_image_file,
    load_tabular_file,
    split_indices,
    tabular_density,
    uea_series,
)

pytest.importorskip("sklearn")


def test_split_indices_are_disjoint_deterministic_and_complete():
    a = split_indices(100, (0.7, 0.2, 0.1), seed=3)
    b = split_indices(100, (0.7, 0.2, 0.1), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [len(x) for x in a] == [70, 20, 10]
    assert sorted(torch.cat(a).tolist()) == list(range(100))
    assert not torch.equal(a[0], split_indices(100, (0.7, 0.2, 0.1), seed=4)[0])
    with pytest.raises(
        ValueError, match=r"fractions: .* three non-negative fractions summing to 1"
    ):
        split_indices(10, (0.5, 0.2, 0.2))


@pytest.mark.parametrize("name", TABULAR)
def test_tabular_density_sets(name):
    data = tabular_density(name, seed=0)
    dims = {"digits": 64, "wine": 13, "breast_cancer": 30, "iris": 4}
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1] == dims[name]
        assert torch.isfinite(split.x).all() and split.y is None
    assert torch.allclose(data.train.x.mean(0), torch.zeros(dims[name]), atol=1e-4)
    again = tabular_density(name, seed=0)
    assert torch.equal(again.test.x, data.test.x)
    if name == "digits":  # dequantised: no longer integer-valued
        raw = data.train.x * data.info["std"] + data.info["mean"]
        assert (raw - raw.round()).abs().max() > 0.1


def test_digits_images():
    data = digits_images(seed=1)
    assert data.train.x.shape[1:] == (1, 8, 8) and data.train.x.dtype == torch.float32
    assert data.train.y.dtype == torch.long and set(data.train.y.tolist()) == set(range(10))
    assert 0.0 <= data.train.x.min() and data.train.x.max() <= 1.0
    assert len(data.train) + len(data.val) + len(data.test) == 1797


def test_uea_japanese_vowels_irregular():
    pytest.importorskip("sktime")
    data = uea_series("JapaneseVowels", seed=0, drop=0.5)
    assert data.info["classes"] == 9 and data.info["channels"] == 12
    batch = data.train.x
    assert batch.values.shape[2] == 12 and batch.values.dtype == torch.float32
    assert len(data.train) + len(data.val) == 270 and len(data.test) == 370
    for b in range(len(batch)):
        t = batch.times[b][batch.valid[b]]
        assert (t[1:] > t[:-1]).all()  # sorted, kept times
    full = uea_series("JapaneseVowels", seed=0, drop=0.0)
    assert full.train.x.valid.sum() > 1.6 * batch.valid.sum()  # about half dropped
    again = uea_series("JapaneseVowels", seed=0, drop=0.5)
    assert torch.equal(again.train.x.times, batch.times)


def test_uea_basic_motions_and_unknown_name():
    pytest.importorskip("sktime")
    data = uea_series("BasicMotions")
    assert data.info["classes"] == 4 and data.test.x.values.shape == (40, 100, 6)
    with pytest.raises(
        ValueError, match=r"name: received 'NotThere'; accepted: a UEA/UCR set bundled"
    ):
        uea_series("NotThere")


def test_user_tabular_files(tmp_path):
    arr = np.random.default_rng(0).normal(size=(5, 3))
    np.save(tmp_path / "a.npy", arr)
    np.savetxt(tmp_path / "a.csv", arr, delimiter=",", header="x,y,z", comments="")
    assert torch.allclose(
        load_tabular_file(tmp_path / "a.npy"), torch.tensor(arr, dtype=torch.float32)
    )
    assert load_tabular_file(tmp_path / "a.csv").shape == (5, 3)
    with pytest.raises(FileNotFoundError, match=r"path: no file at .*missing.npy"):
        load_tabular_file(tmp_path / "missing.npy")
    np.save(tmp_path / "b.npy", np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\); accepted: a 2-D table"):
        load_tabular_file(tmp_path / "b.npy")
    bad = arr.copy()
    bad[1, 1] = np.nan
    np.save(tmp_path / "c.npy", bad)
    with pytest.raises(ValueError, match=r"1 non-finite values"):
        load_tabular_file(tmp_path / "c.npy")


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_user_image_files(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(4, 5, 5))
    _write_idx(tmp_path / "img-ubyte.gz", imgs)
    _write_idx(tmp_path / "lab-ubyte.gz", np.array([0, 1, 2, 3]))
    x, y = load_image_file(tmp_path / "img-ubyte.gz", tmp_path / "lab-ubyte.gz")
    assert x.shape == (4, 1, 5, 5) and torch.allclose(
        x[0, 0], torch.tensor(imgs[0] / 255.0, dtype=torch.float32)
    )
    assert y.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2, 4, 4), dtype=np.float32), y=np.arange(3))
    x, y = load_image_file(tmp_path / "d.npz")
    assert x.shape == (3, 2, 4, 4) and y.shape == (3,)
    np.savez(tmp_path / "e.npz", x=np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"images of shape \(3, 1, 4\)|images of shape \(3, 4\)"):
        load_image_file(tmp_path / "e.npz")
    with open(tmp_path / "trunc-ubyte", "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 10, 5, 5) + b"\x00" * 7)
    with pytest.raises(ValueError, match=r"declares shape \(10, 5, 5\) but holds 7 values"):
        load_image_file(tmp_path / "trunc-ubyte")
    np.savez(tmp_path / "f.npz", x=np.zeros((3, 4, 4), dtype=np.float32), y=np.arange(2))
    with pytest.raises(ValueError, match=r"labels: shape \(2,\) for 3 images"):
        load_image_file(tmp_path / "f.npz")


@pytest.mark.parametrize(
    "text, header, shape, first",
    [
        ("1,2,3\n4,5,6\n", "auto", (2, 3), 1.0),  # no header: nothing dropped
        ("a,b,c\n1,2,3\n", "auto", (1, 3), 1.0),  # every cell non-numeric: a header
        ("1,2,3\n4,5,6\n", True, (1, 3), 4.0),  # told: the first row goes
        ("1\n2\n3\n", "auto", (3, 1), 1.0),  # a single column
        ("x\n2\n3\n", "auto", (2, 1), 2.0),
        ("1,2\n\n3,4\n", False, (2, 2), 1.0),  # blank lines are not rows
    ],
)
def test_csv_header_handling_never_drops_data(tmp_path, text, header, shape, first):
    (tmp_path / "t.csv").write_text(text)
    t = load_tabular_file(tmp_path / "t.csv", header=header)
    assert tuple(t.shape) == shape and float(t[0, 0]) == first


@pytest.mark.parametrize(
    "text, words",
    [
        ("1,x,3\n4,5,6\n", "t.csv line 1 column 2: cannot read 'x' as a number"),  # not a header
        ("a,b\n1,2\n3,q\n", "t.csv line 3 column 2: cannot read 'q'"),
        ("1,2,3\n4,5\n", "t.csv line 2 has 2 columns, 1 of the 2 rows have 3"),
        # a bad first row is the one named: most rows set the width, or the header does
        ("1,2,3,4\n" + "1,2,3\n" * 4, "t.csv line 1 has 4 columns, 4 of the 5 rows have 3"),
        ("a,b,c\n1,2,3,4\n" + "1,2\n" * 4, "t.csv line 2 has 4 columns, the header (line 1) has 3"),
        ("", "holds no rows"),
    ],
)
def test_csv_errors_name_file_line_and_column(tmp_path, text, words):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(ValueError) as err:
        load_tabular_file(tmp_path / "t.csv")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_complex_object_and_1d_arrays(tmp_path):
    np.save(tmp_path / "c.npy", np.ones((3, 2), dtype=np.complex64))
    with pytest.raises(ValueError, match=r"c.npy holds a complex64 array; accepted: real"):
        load_tabular_file(tmp_path / "c.npy")
    np.save(tmp_path / "o.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"o.npy holds an object \(pickled\) array"):
        load_tabular_file(tmp_path / "o.npy")
    np.save(tmp_path / "v.npy", np.arange(4.0))
    assert load_tabular_file(tmp_path / "v.npy").shape == (4, 1)
    with pytest.raises(
        ValueError, match=r"header: received 'yes'; accepted: 'auto', True or False"
    ):
        load_tabular_file(tmp_path / "v.npy", header="yes")


def test_a_table_with_class_names_in_its_label_column(tmp_path):
    """Labels such as ``setosa`` (not numbers) are classes in sorted order; the features
    stay exact; a text cell elsewhere or an empty label is still an error with its line."""
    from node_ocp.data import file_classification

    names = ["virginica", "setosa", "versicolor"]
    rows = [(i * 0.5, -i * 0.25, names[i % 3]) for i in range(30)]
    path = tmp_path / "flowers.csv"
    path.write_text("a,b,species\n" + "".join(f"{a},{b},{n}\n" for a, b, n in rows))
    data = file_classification(path)
    assert data.info["classes"] == 3 and data.info["labels"] == sorted(names)
    xs = torch.cat([data.train.x, data.val.x, data.test.x])
    ys = torch.cat([data.train.y, data.val.y, data.test.y])
    assert xs.shape == (30, 2)  # header and label column gone, every row kept
    # the first feature identifies the row (standardisation is monotone in each feature):
    # every row's label must be the sorted index of its name
    raw = torch.tensor([r[0] for r in rows])
    expected = torch.tensor([sorted(names).index(r[2]) for r in rows])[torch.argsort(raw)]
    assert torch.equal(ys[torch.argsort(xs[:, 0])], expected)
    # integer labels keep their values as the class names
    path.write_text("".join(f"{a},{b},{i % 2 * 5}\n" for i, (a, b, _) in enumerate(rows)))
    assert file_classification(path).info["labels"] == [0, 5]
    path.write_text("a,b,species\n1,x,setosa\n" + "1,2,setosa\n2,3,virginica\n" * 10)
    with pytest.raises(ValueError, match=r"flowers.csv line 2 column 2: cannot read 'x'"):
        file_classification(path)
    path.write_text("a,b,species\n" + "1,2,setosa\n" * 5 + "1,2,\n" + "2,3,virginica\n" * 5)
    with pytest.raises(ValueError, match=r"flowers.csv line 7 column 3: an empty label"):
        file_classification(path)
