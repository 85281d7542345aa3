"""User files: tabular arrays (CSV / NPY / NPZ) and images (MNIST-style IDX or NPZ)."""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .._errors import bad_value
from .cells import class_index, number, read_text


def _path(path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path: no file at {str(p)!r}; accepted: an existing file.")
    return p


def _finite(name: str, arr: np.ndarray, path: Path) -> None:
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(
            f"{name} in {path.name}: {bad} non-finite values; accepted: finite numbers."
        )


HEADERS = ("auto", True, False)


def _check_header(header) -> None:
    if header not in HEADERS or isinstance(header, int) and not isinstance(header, bool):
        raise bad_value("header", header, "'auto', True or False")


def _read_csv(p: Path, delimiter: str, header, text_column: int | None = None):
    """Parse a delimited text table; every bad cell is an error naming line and column.

    Returns ``(table (N, D) float64, texts)``: with ``text_column`` (an index, negative
    from the end) that column's cells are kept as they are written in ``texts`` (N strings;
    the table holds NaN there), e.g. class labels such as ``setosa``; else ``texts`` is None.
    """
    text = read_text(p, "a UTF-8 CSV")
    rows = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not rows:
        raise ValueError(f"path: {p.name} holds no rows; accepted: a table with >= 1 row")
    first = [c.strip() for c in rows[0][1].split(delimiter)]
    if header == "auto":
        header = all(number(c) is None for c in first)
    if header:
        head_line = rows[0][0]
        rows = rows[1:]
        if not rows:
            raise ValueError(f"path: {p.name} holds a header and no data rows")
        width, like = len(first), f"the header (line {head_line}) has {len(first)}"
    else:  # the width most rows have: a bad first row is named as the bad one
        counts = Counter(len(line.split(delimiter)) for _, line in rows)
        width = max(counts, key=lambda w: (counts[w], w == len(first)))
        like = f"{counts[width]} of the {len(rows)} rows have {width}"
    out = np.empty((len(rows), width), dtype=np.float64)
    keep = (
        text_column % width if text_column is not None and -width <= text_column < width else None
    )
    texts: list[str] | None = [] if keep is not None else None
    for r, (line_no, line) in enumerate(rows):
        cells = [c.strip() for c in line.split(delimiter)]
        if len(cells) != width:
            raise ValueError(
                f"path: {p.name} line {line_no} has {len(cells)} columns, {like}; accepted: "
                "every row with the same columns"
            )
        for c, cell in enumerate(cells):
            if c == keep:
                if not cell:
                    raise ValueError(
                        f"path: {p.name} line {line_no} column {c + 1}: an empty label; "
                        "accepted: a class label (a number or a name) in every row"
                    )
                texts.append(cell)
                out[r, c] = math.nan
                continue
            v = number(cell)
            if v is None:
                raise ValueError(
                    f"path: {p.name} line {line_no} column {c + 1}: cannot read {cell!r} as a "
                    "number; accepted: numbers (a header only as the first line, with every "
                    "cell non-numeric, or header=True)"
                )
            out[r, c] = v
    return out, texts


def load_tabular_file(path, delimiter: str = ",", header="auto") -> torch.Tensor:
    """A ``(N, D)`` float32 table from ``.csv``, ``.npy``, or ``.npz`` (its array ``x``, or
    its only array). A single column (or a 1-D array) is ``(N, 1)``.

    header (CSV): ``"auto"`` (the first row is a header when every one of its cells is
    non-numeric), ``True`` (the first row is a header) or ``False`` (none). A cell that is
    not a number, or a row of another width, is an error naming the file, line and column;
    nothing is dropped. Complex, object and string arrays are refused.
    """
    p = _path(path)
    _check_header(header)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        arr, _ = _read_csv(p, delimiter, header)
    elif suffix == ".npy":
        arr = _numpy_read(p, lambda: np.load(p, allow_pickle=False))
    elif suffix == ".npz":
        with _open_npz(p) as z:
            key = "x" if "x" in z.files else (z.files[0] if len(z.files) == 1 else None)
            if key is None:
                raise bad_value("path", str(p), "an .npz with an array 'x' or a single array")
            arr = _numpy_read(p, lambda: z[key])
    else:
        raise bad_value("path", str(p), "a .csv, .npy or .npz file")
    if arr.dtype.kind not in "fiub":
        raise ValueError(
            f"path: {p.name} holds a {arr.dtype} array; accepted: real numbers (float or int; "
            "complex, object and string arrays are refused, not converted)"
        )
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise ValueError(
            f"path: {p.name} holds an array of shape {arr.shape}; accepted: a 2-D table "
            "(rows = samples, columns = features) or a single column."
        )
    _finite("values", arr, p)
    return torch.as_tensor(arr.astype(np.float64), dtype=torch.float32)


def _refuse_object(p: Path):
    raise ValueError(
        f"path: {p.name} holds an object (pickled) array; accepted: real numbers (float or "
        "int arrays)"
    )


def _unreadable(p: Path, exc: BaseException, accepted: str):
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    kind = "IDX" if accepted.startswith("an IDX") else p.suffix.lower()
    raise ValueError(
        f"path: {p.name} is not a readable {kind} file ({type(exc).__name__}: {why}); "
        f"accepted: {accepted}"
    ) from None


_NUMPY_FILE = {".npy": "a file written by numpy.save", ".npz": "a file written by numpy.savez"}


def _numpy_read(p: Path, read):
    """``read()`` (np.load of an .npy, or an array of an .npz): an object array is refused,
    a damaged or foreign file is one ValueError naming it (never "object array" for a
    truncated file)."""
    try:
        return read()
    except ValueError as exc:
        if "Object arrays cannot be loaded" in str(exc):  # numpy's words for allow_pickle
            _refuse_object(p)
        _unreadable(p, exc, _NUMPY_FILE[p.suffix.lower()])
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        _unreadable(p, exc, _NUMPY_FILE[p.suffix.lower()])


def _open_npz(p: Path):
    """``np.load`` of an .npz; a file that is not a zip archive is one ValueError naming it."""
    if not zipfile.is_zipfile(p):
        _unreadable(p, ValueError("not a zip archive"), _NUMPY_FILE[".npz"])
    return _numpy_read(p, lambda: np.load(p, allow_pickle=False))


def _read_idx(p: Path) -> np.ndarray:
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # a .gz that is not gzip, or truncated
        _unreadable(p, exc, "an IDX file (MNIST format), gzipped when its name ends in .gz")
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise bad_value("path", str(p), "an IDX file (MNIST format: magic 0x0000, type, ndim)")
    if len(data) < 4 + 4 * data[3]:
        raise ValueError(
            f"path: {p.name} ends inside its IDX header ({len(data)} bytes for {data[3]} "
            "dimensions); accepted: an IDX file (MNIST format), not truncated"
        )
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(
        data[2]
    )
    if dtype is None:
        raise bad_value("path", str(p), "an IDX file with a known element type")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(
            f"path: {p.name} declares shape {shape} but holds {body.size} values; the file "
            "is truncated or not an IDX file."
        )
    return body.reshape(shape)


def _image_arrays(p: Path, labels_path=None) -> tuple[np.ndarray, np.ndarray | None]:
    """The raw image array ``(N, C, H, W)`` of ``p`` (IDX or .npz) and its labels, if any."""
    labels = None
    if p.suffix.lower() == ".npz":
        with _open_npz(p) as z:
            if "x" not in z.files:
                raise bad_value("path", str(p), "an .npz with an image array 'x' (and labels 'y')")
            images = _numpy_read(p, lambda: z["x"])
            labels = _numpy_read(p, lambda: z["y"]) if "y" in z.files else None
    else:
        images = _read_idx(p)
    if labels_path is not None:
        labels = _read_idx(_path(labels_path))
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(
            f"path: {p.name} holds images of shape {images.shape}; accepted: (N, H, W) or "
            "(N, C, H, W)."
        )
    return images, labels


def load_image_file(path, labels_path=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images ``(N, C, H, W)`` float32 in [0, 1] (for 8-bit input) and labels ``(N,)``.

    ``path``: an IDX file (``.idx``, ``-ubyte``, optionally ``.gz``) of shape ``(N, H, W)``
    or an ``.npz`` with arrays ``x`` (``(N, H, W)`` or ``(N, C, H, W)``) and optionally ``y``.
    ``labels_path``: the IDX labels file that goes with IDX images.
    """
    p = _path(path)
    images, labels = _image_arrays(p, labels_path)
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    x = torch.as_tensor(images.astype(np.float32) / scale)
    _finite("images", x.numpy(), p)
    y = None
    if labels is not None:
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels: shape {labels.shape} for {images.shape[0]} images; accepted: "
                f"({images.shape[0]},)."
            )
        y = torch.as_tensor(labels.astype(np.int64))
    return x, y


def file_image_density(path, levels: int = 0, seed: int = 0, fractions=(0.8, 0.1, 0.1)):
    """Images for density estimation (an image CNF), split 80/10/10 with a fixed seed.

    ``path``: IDX images (MNIST's ``train-images-idx3-ubyte``, optionally gzipped) or an
    ``.npz`` with ``x`` (``(N, H, W)`` or ``(N, C, H, W)``); labels are not read. The images
    come back as float32 ``k / (L − 1)`` for integer grey levels ``k = 0..L−1``: integer
    arrays hold ``k`` (``L = levels``, default 256: 8-bit images); float arrays must already
    hold ``k / (L − 1)`` in [0, 1] and need ``levels``. ``info``: ``name``, ``shape``
    ``(C, H, W)``, ``levels``.
    """
    from .splits import Split, TaskData, split_indices

    p = _path(path)
    if not (_is_idx(p) or p.suffix.lower() == ".npz"):
        raise ValueError(
            f"path: {p.name} is not an image file; accepted: IDX images (.idx, .gz, MNIST's "
            "*-ubyte names) or an .npz with an image array 'x' (N, H, W) or (N, C, H, W)"
        )
    if isinstance(levels, bool) or not isinstance(levels, int) or levels == 1 or levels < 0:
        raise bad_value("levels", levels, "0 (the file's own: 256 for integers) or an int >= 2")
    images, _ = _image_arrays(p)
    integers = np.issubdtype(images.dtype, np.integer)
    if not integers and levels == 0:
        raise ValueError(
            f"levels: {p.name} holds {images.dtype} images, not integer grey levels; "
            "accepted: [task].levels = their number of grey levels L (values k / (L - 1))"
        )
    levels = levels or 256
    arr = images.astype(np.float64)
    _finite("images", arr, p)
    k = arr if integers else arr * (levels - 1)
    off = np.abs(k - np.round(k)) > 1e-3
    if off.any() or k.min() < 0 or np.round(k).max() > levels - 1:
        what = "integers" if integers else f"values k / {levels - 1}"
        raise ValueError(
            f"levels: {p.name} holds values from {arr.min():g} to {arr.max():g}, not {what} "
            f"for k = 0..{levels - 1}; accepted: [task].levels = the images' number of grey "
            "levels L"
        )
    x = torch.as_tensor(np.round(k) / (levels - 1), dtype=torch.float32)
    _enough_rows(path, x.shape[0])
    tr, va, te = split_indices(x.shape[0], fractions, seed)
    info = {"name": p.name, "shape": tuple(x.shape[1:]), "levels": levels}
    return TaskData(Split(x[tr]), Split(x[va]), Split(x[te]), info)


def file_density(path, header="auto", seed: int = 0, fractions=(0.8, 0.1, 0.1)):
    """A user table as density-estimation splits (float32 ``(N, D)``), seeded 80/10/10,
    standardised with the training split's statistics."""
    from .splits import Split, TaskData, split_indices, standardize

    x = load_tabular_file(path, header=header)
    _enough_rows(path, x.shape[0])
    tr, va, te = split_indices(x.shape[0], fractions, seed)
    (xtr, xva, xte), (mean, std) = standardize(x[tr], x[va], x[te])
    info = {"name": Path(path).name, "dim": x.shape[1], "mean": mean, "std": std}
    return TaskData(Split(xtr), Split(xva), Split(xte), info)


def file_classification(
    path,
    header="auto",
    label_column: int = -1,
    labels_path=None,
    seed: int = 0,
    fractions=(0.8, 0.1, 0.1),
    format: str = "auto",
):
    """A user table with a label column as classification splits: features float32
    ``(N, D)`` standardised with training statistics, labels int64 ``(N,)`` (the column's
    distinct values in sorted order as classes 0..K-1). ``.idx``/``.gz`` images or an
    ``.npz`` with ``x`` (``(N, H, W)`` or ``(N, C, H, W)``) and ``y`` give image splits
    (IDX images take their labels from ``labels_path``). ``format``: ``"auto"`` (images or a
    table as the file says), ``"table"`` or ``"images"`` (a file of the other kind is an
    error)."""
    from .splits import Split, TaskData, split_indices, standardize

    p = _path(path)
    if format not in ("auto", "table", "images"):
        raise bad_value("format", format, "'auto', 'table' or 'images'")
    images = format != "table" and (_is_idx(p) or _npz_images(p))
    if format == "images" and not images:
        raise ValueError(
            f"path: {p.name} is not an image file; accepted with format = 'images': IDX "
            "images (.idx, .gz, MNIST's *-ubyte names) or an .npz with 'x' (N, H, W) or "
            "(N, C, H, W) and 'y'"
        )
    if images:
        images, labels = load_image_file(p, labels_path)
        if labels is None:
            raise ValueError(
                f"path: {p.name} holds images without labels; accepted: an .npz "
                "with arrays 'x' and 'y'"
            )
        _enough_rows(path, images.shape[0])
        tr, va, te = split_indices(images.shape[0], fractions, seed)
        classes = int(labels.max()) + 1
        info = {"name": p.name, "classes": classes, "shape": tuple(images.shape[1:])}
        return TaskData(
            Split(images[tr], labels[tr]),
            Split(images[va], labels[va]),
            Split(images[te], labels[te]),
            info,
        )
    texts = None
    if p.suffix.lower() == ".csv":  # labels may be names (setosa, ...) or numbers
        _check_header(header)
        arr, texts = _read_csv(p, ",", header, text_column=label_column)
        _finite("values", np.delete(arr, label_column % arr.shape[1], 1), p)
        table = torch.as_tensor(arr, dtype=torch.float32)
    else:
        table = load_tabular_file(p, header=header)
    cols = table.shape[1]
    if not -cols <= label_column < cols or cols < 2:
        raise ValueError(
            f"label_column: received {label_column} for {p.name} with {cols} columns; "
            f"accepted: an int in [{-cols}, {cols - 1}] on a table with >= 2 columns"
        )
    col = label_column % cols
    if texts is not None:  # class names or numbers, as written
        values, index = class_index(texts)
        labels = torch.tensor([index[t] for t in texts], dtype=torch.long)
    else:
        raw = table[:, col]
        uniq, labels = torch.unique(raw, sorted=True, return_inverse=True)
        values = uniq.tolist()
    if any(isinstance(v, float) and not v.is_integer() for v in values):
        raise ValueError(
            f"label_column: column {col + 1} of {p.name} holds non-integer values; "
            "accepted: integer class labels or class names"
        )
    values = [int(v) if isinstance(v, float) else v for v in values]
    if len(values) < 2:
        raise ValueError(f"label_column: column {col + 1} of {p.name} holds one class only")
    x = torch.cat([table[:, :col], table[:, col + 1 :]], dim=1)
    _enough_rows(path, x.shape[0])
    tr, va, te = split_indices(x.shape[0], fractions, seed)
    (xtr, xva, xte), _ = standardize(x[tr], x[va], x[te])
    info = {"name": p.name, "dim": x.shape[1], "classes": len(values), "labels": values}
    return TaskData(Split(xtr, labels[tr]), Split(xva, labels[va]), Split(xte, labels[te]), info)


def _is_idx(p: Path) -> bool:
    """An IDX file by its name: ``.gz``, ``.idx``, or MNIST's own ``train-images-idx3-ubyte``
    / ``train-images.idx3-ubyte`` (the last suffix is then not ``.ubyte``)."""
    name = p.name.lower().removesuffix(".gz")
    return p.suffix.lower() in (".gz", ".idx") or name.endswith("ubyte")


def _npz_images(p: Path) -> bool:
    if p.suffix.lower() != ".npz":
        return False
    with _open_npz(p) as z:
        return "x" in z.files and "y" in z.files and _numpy_read(p, lambda: z["x"]).ndim >= 3


def _enough_rows(path, n: int) -> None:
    if n < 10:
        raise ValueError(
            f"path: {Path(path).name} holds {n} rows; accepted: >= 10 (train, validation "
            "and test splits of 80/10/10%)"
        )
