"""Users' own irregular time series from files: a long CSV table or sktime/UEA ``.ts`` files.

**Long CSV** (``format = "long"``; one row per series and time point). A header row is
required; column names are matched without regard to case, in any order:

- ``series``: the series' id (any text or number, compared as text). The rows of one series
  need not be contiguous: they are gathered by id (series in order of first appearance) and
  sorted by time;
- ``time``: a finite number; two rows of one series with the same time are an error;
- every other column (except ``label``) is a channel, named by its header cell. An empty
  cell, ``nan`` or ``?`` means: that channel is not observed at that time. A row with no
  observed channel adds no time point; a series with no observed value at all is an error;
- ``label`` (optional; needed for classification): the series' class, text or integer,
  the same on every row of a series. Classes are numbered 0..K-1 in sorted order of their
  values (numerically when every class is a number, else as text).

Example (two series, 2 channels, ``y`` not observed at time 0.7 of series ``a``)::

    series,time,x,y,label
    a,0.0,0.12,1.5,walk
    a,0.7,0.31,,walk
    b,0.2,-1.0,0.4,run

**sktime / UEA ``.ts``** (``format = "ts"``): header tags ``@problemName``,
``@timeStamps``, ``@missing``, ``@univariate``, ``@dimensions``, ``@equalLength``,
``@seriesLength``, ``@classLabel true <labels...>`` or ``false``, ``@targetLabel false``
(regression targets, ``@targetLabel true``, are refused) and ``@data``; ``#`` starts a
comment line. A data line is ``dim1:dim2:...[:label]``, each dimension comma-separated
values (``?`` or ``NaN``: missing), or ``(t,v),(t,v),...`` with ``@timeStamps true``.
Without time stamps a value's time is its position 0, 1, 2, ...; channels are named
``dim_0``, ``dim_1``, ... . A ``*_TRAIN.ts`` file with a sibling ``*_TEST.ts`` (``_test``
also) brings its test split along.

Every problem in a file is a ``ValueError`` whose first line starts ``path:`` and names the
file, the line (1-based) and the column (CSV) or dimension (``.ts``), what was received and
what is accepted.

The builders :func:`file_series_classification` and :func:`file_series_forecast` turn a file
into :class:`~node_ocp.data.splits.TaskData` of
:class:`~node_ocp.data.irregular.IrregularBatch` splits:

- splits by series, seeded: 80/10/10 (at least one series in each; >= 3 series), or, for a
  ``.ts`` file with a test sibling, that file as the test split and a seeded 20% of the
  training file (at least one) as validation;
- times: each series shifted to start at 0 and divided by the longest span (last minus
  first time) of the training series, so training times lie in [0, 1] (validation and test
  series are not looked at: theirs may exceed 1); ``info["time_scale"]`` is that span in
  the file's units (1 when every series has one point), ``info["time_offsets"]`` each
  split's series start times;
- channels standardised with the mean and standard deviation (population, NaN-aware: over
  the observed entries) of the training series, ``info["mean"]``/``info["std"]`` (``(C,)``).
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._errors import bad_value
from .cells import class_index, number, read_text
from .forecast import PREDICTS, held_out
from .irregular import collate_irregular
from .splits import Split, TaskData

FORMATS = ("auto", "long", "ts")
#: the roles of a long CSV's columns that ``columns=`` may rename
ROLES = ("series", "time", "label")
_MISSING = ("", "nan", "?")


@dataclass
class SeriesSet:
    """The series of one file, as written there (times not shifted, values not scaled).

    times: per series a float64 ``(L_i,)`` tensor, strictly increasing.
    values: per series a float64 ``(L_i, C)`` tensor, NaN where a channel is not observed;
        every time point has at least one observed channel.
    ids: per series its id (CSV: the ``series`` cell; ``.ts``: its case number 0, 1, ...).
    lines: per series the file line where it starts (for error messages).
    labels: per series its label text, or None for a file without labels.
    classes: the declared classes (``.ts`` ``@classLabel``), or None.
    """

    file: str
    name: str
    channels: list[str]
    times: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    labels: list[str] | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.times)


def _file(path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path: no file at {str(p)!r}; accepted: an existing file.")
    return p


def _value(cell: str) -> float | None:
    """A channel cell: NaN when missing, None when unreadable, else the (finite?) number."""
    if cell.strip().lower() in _MISSING:
        return math.nan
    return number(cell)


# --------------------------------------------------------------------------- long CSV


def read_long_csv(path, columns: dict[str, str] | None = None) -> SeriesSet:
    """Read a long CSV of series (see the module's docstring for the format).

    ``columns`` names the file's own columns for the roles ``series``, ``time`` and
    ``label`` (e.g. ``{"series": "patient", "time": "hour", "label": "outcome"}``); a role
    not named there is the column of that name.

    Returns a :class:`SeriesSet`; ``values`` of each series ``(L_i, C)`` with ``C`` the
    channel columns in header order. Every bad cell is a ``ValueError`` naming the file,
    the line and the column.
    """
    p = _file(path)
    name = p.name
    text = read_text(p, "a UTF-8 CSV with a header row (series, time, channels..., label)")
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    header_line = 0
    cols: dict[str, int] = {}
    chans: list[int] = []
    rows: dict[str, list] = {}
    first_line: dict[str, int] = {}
    label_of: dict[str, tuple[str, int]] = {}

    def where(line: int, c: int) -> str:
        return f"path: {name} line {line} column {c + 1} ({header[c]!r})"

    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if header is None:
            header, header_line = cells, line
            cols = _header_columns(name, line, header, columns)
            chans = [c for c in range(len(header)) if c not in cols.values()]
            continue
        if len(cells) != len(header):
            raise ValueError(
                f"path: {name} line {line} has {len(cells)} columns, the header (line "
                f"{header_line}) {len(header)}; accepted: every row with the header's columns"
            )
        sid = cells[cols["series"]]
        if not sid:
            raise ValueError(
                f"{where(line, cols['series'])}: an empty series id; accepted: an id (text "
                "or number) on every row"
            )
        t = number(cells[cols["time"]])
        if t is None or not math.isfinite(t):
            raise ValueError(
                f"{where(line, cols['time'])}: cannot read {cells[cols['time']]!r} as a time; "
                "accepted: a finite number"
            )
        vals = []
        for c in chans:
            v = _value(cells[c])
            if v is None or math.isinf(v):
                raise ValueError(
                    f"{where(line, c)}: cannot read {cells[c]!r} as a value; accepted: a "
                    "finite number, or an empty cell or nan for 'not observed'"
                )
            vals.append(v)
        if "label" in cols:
            lab = cells[cols["label"]]
            if not lab:
                raise ValueError(
                    f"{where(line, cols['label'])}: an empty label; accepted: the series' "
                    "class (text or integer) on every row"
                )
            seen = label_of.setdefault(sid, (lab, line))
            if seen[0] != lab:
                raise ValueError(
                    f"{where(line, cols['label'])}: label {lab!r} for series {sid!r}, which "
                    f"has label {seen[0]!r} at line {seen[1]}; accepted: one label per series"
                )
        first_line.setdefault(sid, line)
        rows.setdefault(sid, []).append((t, line, vals))
    if header is None:
        raise ValueError(
            f"path: {name} holds no rows; accepted: a header row (series, time, channels..., "
            "label) and data rows"
        )
    if not rows:
        raise ValueError(f"path: {name} holds a header (line {header_line}) and no data rows")
    out = SeriesSet(name, p.stem, [header[c] for c in chans])
    out.labels = [] if "label" in cols else None
    time_col = cols["time"]
    for sid, items in rows.items():
        items.sort(key=lambda r: r[0])  # stable: equal times keep file order
        for (t0, l0, _), (t1, l1, _) in zip(items[:-1], items[1:]):
            if t1 == t0:
                raise ValueError(
                    f"{where(l1, time_col)}: time {t1!r} of series {sid!r} again (also line "
                    f"{l0}); accepted: one row per series and time (strictly increasing "
                    "times after sorting)"
                )
        times = torch.tensor([r[0] for r in items], dtype=torch.float64)
        values = torch.tensor([r[2] for r in items], dtype=torch.float64).reshape(
            len(items), len(chans)
        )
        seen = ~torch.isnan(values).all(1)
        if not bool(seen.any()):
            names = ", ".join(f"{c + 1} ({header[c]!r})" for c in chans)
            raise ValueError(
                f"path: {name} line {first_line[sid]} columns {names}: series {sid!r} has "
                f"no observed value on any of its {len(items)} rows; accepted: at least one "
                "number per series"
            )
        out.times.append(times[seen])
        out.values.append(values[seen])
        out.ids.append(sid)
        out.lines.append(first_line[sid])
        if out.labels is not None:
            out.labels.append(label_of[sid][0])
    return out


def _header_columns(
    name: str, line: int, header: list[str], columns: dict[str, str] | None = None
) -> dict[str, int]:
    columns = dict(columns or {})
    for role, col in columns.items():
        if role not in ROLES:
            raise bad_value("columns", columns, f"a mapping of {', '.join(ROLES)} to column names")
        if not isinstance(col, str) or not col:
            raise bad_value(f"columns[{role!r}]", col, "a column name of the header")
    lower = [h.lower() for h in header]
    for c, h in enumerate(header):
        if not h:
            raise ValueError(
                f"path: {name} line {line} column {c + 1}: an empty column name; accepted: "
                "a header row naming every column (series, time, channels..., label)"
            )
        if lower.index(h.lower()) != c:
            raise ValueError(
                f"path: {name} line {line} column {c + 1}: column name {h!r} again (column "
                f"{lower.index(h.lower()) + 1}); accepted: distinct column names"
            )
    wanted = {k: columns.get(k, k).lower() for k in ROLES}
    cols = {k: lower.index(c) for k, c in wanted.items() if c in lower}
    for a in cols:
        for b in cols:
            if a < b and cols[a] == cols[b] and (a in columns or b in columns):
                raise ValueError(
                    f"columns: {a} and {b} both name column {cols[a] + 1} "
                    f"({header[cols[a]]!r}) of {name}; accepted: a column of its own for each"
                )
    for key in ROLES:
        if key in columns and key not in cols:
            raise ValueError(
                f"columns: {key} = {columns[key]!r} is not a column of {name} (line {line}: "
                f"{', '.join(header)}); accepted: a column name of the header"
            )
    for key in ("series", "time"):
        if key not in cols:
            received = ", ".join(header)
            raise ValueError(
                f"path: {name} line {line}: no column named {key!r} in the header "
                f"(received: {received}); accepted: a header row with columns series, time, "
                "one per channel and optionally label, or [task].columns = {series = ..., "
                "time = ..., label = ...} naming your columns"
            )
    if len(header) == len(cols):
        raise ValueError(
            f"path: {name} line {line}: no channel column (received: {', '.join(header)}); "
            "accepted: at least one column besides series, time and label"
        )
    return cols


# --------------------------------------------------------------------------- .ts files

_TAGS = (
    "@problemName",
    "@timeStamps",
    "@missing",
    "@univariate",
    "@dimensions",
    "@equalLength",
    "@seriesLength",
    "@classLabel",
    "@targetLabel",
    "@data",
)
_BOOL = {"true": True, "false": False}
_PAIR = re.compile(r"\(([^()]*)\)")


def read_ts_file(path) -> SeriesSet:
    """Read an sktime/UEA ``.ts`` file (see the module's docstring), written for this package.

    Returns a :class:`SeriesSet`: series ``i`` (id ``str(i)``) has ``values (L_i, C)``,
    ``C`` the dimensions; without time stamps its times are ``0, 1, ..., L_i - 1``. Time
    points where every dimension is missing (the padding of shorter dimensions) are left
    out. Problems are ``ValueError`` naming the file, the line and what is accepted.
    """
    p = _file(path)
    name = p.name
    text = read_text(p, "a UTF-8 sktime/UEA .ts file")
    tags: dict[str, tuple[object, int]] = {}
    out: SeriesSet | None = None
    dims: int | None = None
    accepted_tags = ", ".join(_TAGS)
    for i, raw in enumerate(text.splitlines()):
        line, s = i + 1, raw.strip()
        if not s or s.startswith("#"):
            continue
        if out is None:
            if not s.startswith("@"):
                raise ValueError(
                    f"path: {name} line {line}: {_short(s)!r} before @data; accepted: header "
                    f"tags ({accepted_tags}) and # comments, then @data and the data lines"
                )
            tag, _, rest = s.partition(" ")
            key = tag.lower()
            known = {t.lower(): t for t in _TAGS}
            if key not in known:
                raise ValueError(
                    f"path: {name} line {line}: unknown tag {tag!r}; accepted: {accepted_tags}"
                )
            tags[key] = (_tag_value(name, line, known[key], rest.split()), line)
            if key == "@data":
                out = _start_ts(name, p.stem, tags)
                dims = tags["@dimensions"][0] if "@dimensions" in tags else None
                if tags.get("@univariate", (False,))[0]:
                    if dims not in (None, 1):
                        raise ValueError(
                            f"path: {name} line {tags['@dimensions'][1]}: @dimensions {dims} "
                            "with @univariate true; accepted: @dimensions 1 or no @dimensions"
                        )
                    dims = 1
            continue
        fields = s.split(":")
        labelled = out.classes is not None
        if labelled:
            if len(fields) < 2:
                raise ValueError(
                    f"path: {name} line {line}: no ':label' at the end; accepted: "
                    "dim1:dim2:...:label with @classLabel true"
                )
            label = fields.pop().strip()
            if label not in out.classes:
                raise ValueError(
                    f"path: {name} line {line}: class label {label!r}; accepted: one of the "
                    f"@classLabel labels (line {tags['@classlabel'][1]}): "
                    f"{', '.join(out.classes)}"
                )
        if dims is None:
            dims = len(fields)
        if len(fields) != dims:
            if "@dimensions" in tags:
                said = f"@dimensions {dims}"
            elif tags.get("@univariate", (False,))[0]:
                said = "@univariate true"
            else:
                said = f"{dims} on the first data line"
            raise ValueError(
                f"path: {name} line {line}: {len(fields)} dimensions ({said}); accepted: "
                f"{dims} ':'-separated dimensions" + (" then ':label'" if labelled else "")
            )
        stamps = tags.get("@timestamps", (False,))[0]
        parsed = [_ts_dimension(name, line, d + 1, cell, stamps) for d, cell in enumerate(fields)]
        length = tags.get("@serieslength", (None,))[0]
        if tags.get("@equallength", (False,))[0] and length is not None and not stamps:
            for d, (t, _) in enumerate(parsed):
                if len(t) != length:
                    raise ValueError(
                        f"path: {name} line {line} dimension {d + 1}: {len(t)} values; "
                        f"accepted: {length} (@equalLength true, @seriesLength {length} at "
                        f"line {tags['@serieslength'][1]})"
                    )
        times, values = _merge_dimensions(parsed)
        seen = ~torch.isnan(values).all(1)
        if not bool(seen.any()):
            raise ValueError(
                f"path: {name} line {line}: a series with no observed value; accepted: at "
                "least one number per series (? and NaN are missing)"
            )
        out.times.append(times[seen])
        out.values.append(values[seen])
        out.ids.append(str(len(out.ids)))
        out.lines.append(line)
        if labelled:
            out.labels.append(label)
    if out is None:
        raise ValueError(
            f"path: {name} has no @data line; accepted: a .ts file (header tags, @data, "
            "then one series per line)"
        )
    if not out.times:
        raise ValueError(f"path: {name} holds no series after @data (line {tags['@data'][1]})")
    out.channels = [f"dim_{d}" for d in range(dims)]
    return out


def _short(s: str) -> str:
    return s if len(s) <= 40 else s[:37] + "..."


def _tag_value(name: str, line: int, tag: str, words: list[str]):
    def bad(accepted: str):
        got = " ".join(words) if words else "nothing"
        return ValueError(f"path: {name} line {line}: {tag} {got}; accepted: {tag} {accepted}")

    if tag == "@data":
        if words:
            raise bad("alone on its line")
        return True
    if tag == "@problemName":
        if not words:
            raise bad("<name>")
        return " ".join(words)
    if tag in ("@dimensions", "@seriesLength"):
        if len(words) != 1 or not words[0].isdigit() or int(words[0]) < 1:
            raise bad("<a positive integer>")
        return int(words[0])
    if not words or words[0].lower() not in _BOOL:
        raise bad("true or false" + (" <labels...>" if tag == "@classLabel" else ""))
    flag = _BOOL[words[0].lower()]
    if tag == "@classLabel":
        if flag and len(words) < 2:
            raise bad("true <labels...> (the class labels after true) or false")
        if not flag and len(words) > 1:
            raise bad("false alone, or true <labels...>")
        return words[1:] if flag else None
    if tag == "@targetLabel" and flag:
        raise ValueError(
            f"path: {name} line {line}: @targetLabel true (regression targets) is not "
            "supported; accepted: @classLabel true <labels...> (classification) or "
            "@classLabel false (no labels: forecasting)"
        )
    if len(words) != 1:
        raise bad("true or false")
    return flag


def _start_ts(name: str, stem: str, tags) -> SeriesSet:
    classes = tags.get("@classlabel", (None,))[0]
    problem = tags.get("@problemname", (stem,))[0]
    out = SeriesSet(name, str(problem), [])
    if classes is not None:
        out.classes, out.labels = list(classes), []
    return out


def _ts_dimension(name: str, line: int, dim: int, cell: str, stamps: bool):
    """One dimension's ``(times list, values list)``."""
    where = f"path: {name} line {line} dimension {dim}"
    cell = cell.strip()
    if not cell:
        raise ValueError(
            f"{where}: no values; accepted: comma-separated values (? or NaN: missing)"
        )
    if not stamps:
        times, values = [], []
        for k, item in enumerate(cell.split(",")):
            v = _value(item)
            if v is None or math.isinf(v):
                raise ValueError(
                    f"{where} value {k + 1}: cannot read {item.strip()!r}; accepted: a finite "
                    "number, ? or NaN"
                )
            times.append(float(k))
            values.append(v)
        return times, values
    pairs = _PAIR.findall(cell)
    if not pairs or _PAIR.sub("", cell).replace(",", "").strip():
        raise ValueError(
            f"{where}: {_short(cell)!r}; accepted: (time,value) pairs separated by commas "
            "with @timeStamps true"
        )
    times, values, first = [], [], {}
    for k, pair in enumerate(pairs):
        parts = pair.split(",")
        t = number(parts[0]) if len(parts) == 2 else None
        v = _value(parts[1]) if len(parts) == 2 else None
        if t is None or not math.isfinite(t) or v is None or math.isinf(v):
            raise ValueError(
                f"{where} pair {k + 1}: ({pair}); accepted: (time,value) with a finite "
                "number as time and a finite number, ? or NaN as value"
            )
        if t in first:
            raise ValueError(
                f"{where} pair {k + 1}: time {t!r} again (pair {first[t] + 1}); "
                "accepted: one value per time"
            )
        first[t] = k
        times.append(t)
        values.append(v)
    return times, values


def _merge_dimensions(parsed) -> tuple[torch.Tensor, torch.Tensor]:
    """Dimensions' own ``(times, values)`` -> the union of times ``(L,)``, values ``(L, C)``."""
    grid = sorted({t for times, _ in parsed for t in times})
    index = {t: k for k, t in enumerate(grid)}
    values = torch.full((len(grid), len(parsed)), math.nan, dtype=torch.float64)
    for d, (times, vals) in enumerate(parsed):
        rows = torch.tensor([index[t] for t in times], dtype=torch.long)
        values[rows, d] = torch.tensor(vals, dtype=torch.float64)
    return torch.tensor(grid, dtype=torch.float64), values


# --------------------------------------------------------------------------- builders


def series_format(path, format: str = "auto") -> str:
    """``"long"`` or ``"ts"``: ``format`` itself, or for ``"auto"`` from the suffix
    (``.ts`` -> ``"ts"``, anything else a long CSV)."""
    if format not in FORMATS:
        raise bad_value("format", format, ", ".join(map(repr, FORMATS)))
    if format != "auto":
        return format
    return "ts" if Path(path).suffix.lower() == ".ts" else "long"


def load_series_file(
    path, format: str = "auto", columns: dict[str, str] | None = None
) -> SeriesSet:
    """Read one series file as ``format`` (``"auto"``: by suffix, see :func:`series_format`)."""
    fmt = series_format(path, format)
    return read_ts_file(path) if fmt == "ts" else read_long_csv(path, columns)


def sibling_test_file(path) -> Path | None:
    """The ``*_TEST.ts`` (or ``*_test.ts``) next to a ``*_TRAIN.ts`` (``*_train.ts``)."""
    p = Path(path)
    if p.suffix.lower() != ".ts" or not p.stem.lower().endswith("_train"):
        return None
    base = p.stem[: -len("_train")]
    for tail in ("_TEST", "_test", "_Test"):
        q = p.with_name(base + tail + p.suffix)
        if q.is_file():
            return q
    return None


def _read(path, format: str, columns=None) -> tuple[SeriesSet, SeriesSet | None]:
    p = _file(path)
    fmt = series_format(p, format)
    main = load_series_file(p, fmt, columns)
    sibling = sibling_test_file(p) if fmt == "ts" else None
    test = read_ts_file(sibling) if sibling is not None else None
    if test is not None and len(test.channels) != len(main.channels):
        raise ValueError(
            f"path: {test.file} has {len(test.channels)} dimensions, {main.file} "
            f"{len(main.channels)}; accepted: a test file like its training file"
        )
    if test is not None and (test.labels is None) != (main.labels is None):
        raise ValueError(
            f"path: {test.file} and {main.file} differ in @classLabel; accepted: both "
            "labelled or both unlabelled"
        )
    return main, test


def _split(main: SeriesSet, test: SeriesSet | None, seed: int):
    """Per split a list of ``(set, index)`` pairs."""
    n = len(main)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if test is not None:
        if n < 2:
            raise ValueError(
                f"path: {main.file} holds {n} series; accepted: >= 2 (training and "
                f"validation; {test.file} is the test split)"
            )
        n_val = min(max(1, round(0.2 * n)), n - 1)
        return (
            [(main, i) for i in perm[n_val:]],
            [(main, i) for i in perm[:n_val]],
            [(test, i) for i in range(len(test))],
        )
    if n < 3:
        raise ValueError(
            f"path: {main.file} holds {n} series; accepted: >= 3 (at least one for each of "
            "the training, validation and test splits of 80/10/10%)"
        )
    n_val = max(1, round(0.1 * n))
    n_test = max(1, round(0.1 * n))
    return (
        [(main, i) for i in perm[n_val + n_test :]],
        [(main, i) for i in perm[:n_val]],
        [(main, i) for i in perm[n_val : n_val + n_test]],
    )


def _time_scale(train) -> float:
    """The longest span of the training series (validation and test series are not seen:
    their times may exceed 1)."""
    span = max(float(s.times[i][-1] - s.times[i][0]) for s, i in train)
    return span if span > 0 else 1.0


def _statistics(train) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-aware per-channel mean and (population) std ``(C,)`` of the training series."""
    values = torch.cat([s.values[i] for s, i in train])
    observed = ~torch.isnan(values)
    count = observed.sum(0)
    if not bool((count > 0).all()):
        c = int((count == 0).nonzero()[0])
        s = train[0][0]
        raise ValueError(
            f"path: {s.file}: channel {s.channels[c]!r} has no observed value in the "
            f"{len(train)} training series; accepted: every channel observed at least once "
            "in the training split"
        )
    filled = torch.where(observed, values, 0.0)
    mean = filled.sum(0) / count
    var = (torch.where(observed, values - mean, 0.0) ** 2).sum(0) / count
    return mean, var.sqrt().clamp_min(1e-6)


def _prepare(path, format, drop, seed, dtype, columns=None):
    if not (0.0 <= drop < 1.0):
        raise bad_value("drop", drop, "a fraction in [0, 1)")
    main, test = _read(path, format, columns)
    parts = _split(main, test, seed)
    scale = _time_scale(parts[0])
    mean, std = _statistics(parts[0])
    info = {
        "name": main.name,
        "file": main.file,
        "test_file": None if test is None else test.file,
        "format": series_format(path, format),
        "channels": len(main.channels),
        "channel_names": list(main.channels),
        "time_scale": scale,
        "mean": mean.to(dtype),
        "std": std.to(dtype),
        "drop": drop,
        "series": {k: [s.ids[i] for s, i in p] for k, p in zip(("train", "val", "test"), parts)},
        "time_offsets": {
            k: [float(s.times[i][0]) for s, i in p] for k, p in zip(("train", "val", "test"), parts)
        },
    }

    def one(s: SeriesSet, i: int):
        t = (s.times[i] - s.times[i][0]) / scale
        return t, (s.values[i] - mean) / std

    return main, test, parts, info, one


def _keep(n: int, drop: float, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(n, generator=gen) >= drop
    if not keep.any():
        keep[torch.randint(0, n, (1,), generator=gen)] = True
    return keep


def file_series_classification(
    path,
    format: str = "auto",
    drop: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    columns: dict[str, str] | None = None,
) -> TaskData:
    """A labelled series file (long CSV with a ``label`` column, or ``.ts`` with
    ``@classLabel true``) as classification splits.

    Each split's ``x`` is an :class:`~node_ocp.data.irregular.IrregularBatch` (``times
    (B, L)`` in [0, 1], ``values (B, L, C)`` standardised, ``mask (B, L, C)``), its ``y``
    the class indices int64 ``(B,)``. ``drop`` in [0, 1) removes that fraction of every
    series' time points at random (seeded; at least one kept). ``info``: ``name``,
    ``channels`` (C), ``channel_names``, ``classes`` (K), ``labels`` (the class of each
    index), ``time_scale``, ``mean``/``std`` ``(C,)``, ``series`` (each split's ids).
    ``columns``: the long CSV's own names of the series, time and label columns (see
    :func:`read_long_csv`).
    """
    main, test, parts, info, one = _prepare(path, format, drop, seed, dtype, columns)
    if main.labels is None:
        what = "no @classLabel true" if info["format"] == "ts" else "no 'label' column"
        raise ValueError(
            f"path: {main.file} has {what}; accepted: a label per series for "
            "classification (a long CSV's label column, a .ts file's @classLabel true)"
        )
    raw = set(main.labels) | set(main.classes or [])
    if test is not None:
        raw |= set(test.labels) | set(test.classes or [])
    classes, index = class_index(raw)
    if len(classes) < 2:
        raise ValueError(
            f"path: {main.file} holds one class only ({classes[0]!r}); accepted: >= 2 classes"
        )
    gen = torch.Generator().manual_seed(seed + 1)
    splits = []
    for part in parts:
        items, ys = [], []
        for s, i in part:
            t, v = one(s, i)
            if drop > 0:
                keep = _keep(len(t), drop, gen)
                t, v = t[keep], v[keep]
            items.append((t.to(dtype), v.to(dtype), None))
            ys.append(index[s.labels[i]])
        splits.append(Split(collate_irregular(items), torch.tensor(ys, dtype=torch.long)))
    info.update(classes=len(classes), labels=classes)
    return TaskData(*splits, info)


def file_series_forecast(
    path,
    format: str = "auto",
    observe: float = 0.75,
    drop: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    columns: dict[str, str] | None = None,
    predict: str = "extrapolate",
) -> TaskData:
    """A series file (labels, if any, ignored) as forecasting splits.

    ``predict = "interpolate"``: per series a random ``drop`` fraction of its time points
    (at least one, and one kept; seeded) are held out as ``y``, the rest is ``x``; a series
    of one time point is an error. Otherwise (``"extrapolate"``) as follows.

    Per series, the past is its time points before ``observe`` of its own span (times
    ``t < observe * t_last`` after the shift to 0) and the future the rest. Each split's
    ``x`` is the past, an :class:`~node_ocp.data.irregular.IrregularBatch` (``times
    (B, L)``, ``values``/``mask (B, L, C)``) with a random ``drop`` fraction of its time
    points removed (seeded; at least one kept); ``y`` the future, an ``IrregularBatch``
    whose ``times (B, Q)`` are the query times and ``values``/``mask (B, Q, C)`` the
    standardised targets. A series with no time point on one side of its cut is an error.
    """
    if predict not in PREDICTS:
        raise bad_value("predict", predict, f"one of {', '.join(map(repr, PREDICTS))}")
    if predict == "interpolate" and not (0.0 < drop < 1.0):
        raise bad_value("drop", drop, "a fraction in (0, 1) of time points held out")
    if not (0.0 < observe < 1.0):
        raise bad_value("observe", observe, "a fraction in (0, 1)")
    main, test, parts, info, one = _prepare(path, format, drop, seed, dtype, columns)
    gen = torch.Generator().manual_seed(seed + 1)
    splits = []
    for part in parts:
        past, future = [], []
        for s, i in part:
            t, v = one(s, i)
            if predict == "interpolate":
                if len(t) < 2:
                    raise ValueError(
                        f"path: {s.file} line {s.lines[i]}: series {s.ids[i]!r} has "
                        f"{len(t)} time point; accepted: series of >= 2 time points to hold "
                        "some out (predict = 'interpolate')"
                    )
                out = held_out(len(t), drop, gen)
                past.append((t[~out].to(dtype), v[~out].to(dtype), None))
                future.append((t[out].to(dtype), v[out].to(dtype), None))
                continue
            before = t < observe * t[-1]
            for side, mask in (("before", before), ("at or after", ~before)):
                if not bool(mask.any()):
                    raise ValueError(
                        f"path: {s.file} line {s.lines[i]}: series {s.ids[i]!r} ({len(t)} "
                        f"time point(s)) has none {side} observe = {observe} of its span; "
                        "accepted: series with time points on both sides of the cut (>= 2 "
                        "time points each)"
                    )
            tp, vp = t[before], v[before]
            if drop > 0:
                keep = _keep(len(tp), drop, gen)
                tp, vp = tp[keep], vp[keep]
            past.append((tp.to(dtype), vp.to(dtype), None))
            future.append((t[~before].to(dtype), v[~before].to(dtype), None))
        splits.append(Split(collate_irregular(past), collate_irregular(future)))
    info["observe"] = observe
    info["predict"] = predict
    return TaskData(*splits, info)
