"""Atomic file writes: a failed or interrupted write never leaves a partial file behind."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, then rename it to
    ``path``: readers see the old file or the whole new one, never a part."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path, obj: Any) -> Path:
    """``atomic_write_text`` of ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2))
