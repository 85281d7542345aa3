"""User files: tabular arrays (CSV / NPY / NPZ) and images (MNIST-style IDX or NPZ)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from .._errors import bad_value


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


def load_tabular_file(path, delimiter: str = ",") -> torch.Tensor:
    """A ``(N, D)`` float32 table from ``.csv`` (no header, or a non-numeric first row),
    ``.npy``, or ``.npz`` (its array ``x``, or its only array)."""
    p = _path(path)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        try:
            arr = np.loadtxt(p, delimiter=delimiter, dtype=np.float64)
        except ValueError:
            arr = np.loadtxt(p, delimiter=delimiter, dtype=np.float64, skiprows=1)
    elif suffix == ".npy":
        arr = np.load(p)
    elif suffix == ".npz":
        with np.load(p) as z:
            key = "x" if "x" in z.files else (z.files[0] if len(z.files) == 1 else None)
            if key is None:
                raise bad_value("path", str(p), "an .npz with an array 'x' or a single array")
            arr = z[key]
    else:
        raise bad_value("path", str(p), "a .csv, .npy or .npz file")
    if arr.ndim != 2:
        raise ValueError(
            f"path: {p.name} holds an array of shape {arr.shape}; accepted: a 2-D table "
            "(rows = samples, columns = features)."
        )
    _finite("values", arr, p)
    return torch.as_tensor(arr, dtype=torch.float32)


def _read_idx(p: Path) -> np.ndarray:
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise bad_value("path", str(p), "an IDX file (MNIST format: magic 0x0000, type, ndim)")
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


def load_image_file(path, labels_path=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images ``(N, C, H, W)`` float32 in [0, 1] (for 8-bit input) and labels ``(N,)``.

    ``path``: an IDX file (``.idx``, ``-ubyte``, optionally ``.gz``) of shape ``(N, H, W)``
    or an ``.npz`` with arrays ``x`` (``(N, H, W)`` or ``(N, C, H, W)``) and optionally ``y``.
    ``labels_path``: the IDX labels file that goes with IDX images.
    """
    p = _path(path)
    labels = None
    if p.suffix.lower() == ".npz":
        with np.load(p) as z:
            if "x" not in z.files:
                raise bad_value("path", str(p), "an .npz with an image array 'x' (and labels 'y')")
            images = z["x"]
            labels = z["y"] if "y" in z.files else None
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
