"""Cells of users' text files: reading the text, numbers, class labels.

Shared by the table reader (:mod:`.files`) and the series reader (:mod:`.series_files`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path


def read_text(p: Path, accepted: str) -> str:
    """The text of ``p`` (UTF-8; a BOM, as Excel's "CSV UTF-8" writes, is dropped); a file
    that is not text is a ValueError naming it."""
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"path: {p.name} is not a text file; accepted: {accepted}") from None


def number(cell: str) -> float | None:
    """``cell`` as a float, None when it is not a number."""
    try:
        return float(cell)
    except ValueError:
        return None


def class_index(labels: Iterable[str]) -> tuple[list, dict[str, int]]:
    """The classes of the label texts in sorted order (numerically when every label is a
    number, else as text) and each text's class index. Number labels are given back as
    numbers (ints when integral); two texts of one number ("1", "01") stay two classes."""
    texts = sorted(set(labels))
    numbers = {c: number(c) for c in texts}
    values: list = list(texts)
    if all(v is not None and math.isfinite(v) for v in numbers.values()):
        texts.sort(key=lambda c: (numbers[c], c))
        as_numbers = [int(numbers[c]) if numbers[c].is_integer() else numbers[c] for c in texts]
        values = as_numbers if len(set(as_numbers)) == len(as_numbers) else list(texts)
    return values, {c: k for k, c in enumerate(texts)}
