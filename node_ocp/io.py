"""Atomic file writes: a failed or interrupted write never leaves a partial file behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def atomic_write_json(path, obj: Any) -> Path:
    """``atomic_write_text`` of ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2))
