"""The bad-input and fault catalogue (issue 15): every case a user can hit, one standard.

The catalogue is two lists of records. ``CASES`` are command lines: each :class:`Case` names
its argv (``{tmp}``, ``{cfg}`` and ``{run}`` stand for the case's folder, a tiny config in
it and a copy of one finished run), a set-up that writes files into the folder, the
expected exit status (2 for anything the user can fix, 3 = ``EXIT_DIVERGED`` for a diverged
run, 130 / 143 for SIGINT / SIGTERM, 0 where the right answer is to do the work, e.g.
``--overwrite`` or a one-column table), a substring naming the argument or key at fault and
one naming what is accepted, and the files that must keep their bytes. ``test_cli_case``
runs each through ``node_ocp.cli.main(argv)`` in this process and asserts: the status;
exactly one line on stderr, ``node-ocp: error: ...`` (no traceback, no usage block; for
status 0 and 3 stderr is empty and the line is the run's own ``done:``/``diverged:``); that
the line names the argument and what is accepted; and that every file and folder that
existed before is still there, byte-identical (nothing already written is lost), unless the
case documents the change (``changed``: files the command replaces, e.g. with
``--overwrite``; ``appended``: a log that may only grow). ``creates_nothing`` cases also
check that a refusal leaves no new file or folder (``leaves_empty``: a documented empty
``--out`` folder). ``LIB_CASES`` are library calls (user data files, optimizer state dicts)
checked by ``test_library_case``: the error type, and a first line naming the parameter
and, for files, the file, line and column. ``test_catalogue_counts`` (last in this file;
``python tests/test_fault_catalogue.py`` runs the file and prints it) gives the number of
cases, how many gave exactly one line and how many lost data (must be 0).

Two faults are exercised for real elsewhere and simulated here: SIGTERM to ``compare``
(tests/test_cli.py::test_sigterm_to_compare_reaches_its_child_run sends a real signal to a
real child; here a fake child sees the signal compare's handler passes on, and is waited
for) and a full disk (tests/test_train.py::
test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous; here ``torch.save``
fails at the second checkpoint of a CLI run and the first still loads).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mlp_field, ocnopt_step
from torch import nn
from train_helpers import tiny, write_toml

import node_ocp as no
from node_ocp.cli import EXIT_USAGE, main
from node_ocp.data import file_classification, load_image_file, load_tabular_file
from node_ocp.train.loop import EXIT_DIVERGED

ROOT = Path(__file__).resolve().parents[1]

#: A tiny density run: 4 steps of Adam on 64 points of 8 Gaussians, checkpoints at 2 and 4.
TINY = tiny(
    **{
        "task.n_train": 64,
        "task.n_val": 16,
        "task.n_test": 16,
        "model.hidden": [4],
        "train.optimizer": "adam",
        "train.steps": 4,
        "train.batch_size": 32,
        "train.eval_every": 2,
        "train.checkpoint_every": 2,
    }
)
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "summary.json")
TRAIN = ["train", "{cfg}", "--no-progress"]
CKPT = "run/checkpoint.pt"

#: The faults listed under "Why" in issue 15; each must be the ``why`` of at least one case.
WHY = {
    "train overwrites a finished run",
    "the default --out overwrites the previous run",
    "compare replaces report.md",
    "a first row that fails to parse is dropped as a header",
    "a ragged row is dropped",
    "a single-column CSV is refused",
    "a complex .npy loses its imaginary part",
    "a text cell gives numpy's message without file and line",
    "--resume on a truncated checkpoint",
    "--resume on an empty checkpoint",
    "--resume on random bytes",
    "--resume on a text file",
    "a full disk during a checkpoint",
    "plot on a corrupt comparison.json",
    "the resume mismatch does not name the key",
    "SIGTERM to compare orphans its child",
    "a diverged train exits 0",
    "--resume on a missing folder leaves a folder",
    "batch_size larger than the data",
    "OCNOpt state of a 16-wide model loads into a 32-wide one",
    "no own data on the command line",
}


# ----------------------------------------------------------------- set-up helpers
def _cfg(tmp: Path, name: str = "tiny.toml", **over) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for path, value in over.items():
        table, key = path.split(".", 1)
        if table == "optimizers":
            opt, key = key.split(".")
            cfg["optimizers"].setdefault(opt, {})[key] = value
        elif value is None:
            cfg[table].pop(key, None)
        else:
            cfg.setdefault(table, {})[key] = value
    return write_toml(tmp / name, cfg)


def config(**over) -> Callable[[Path], None]:
    """A set-up writing ``bad.toml``: the tiny config with ``over`` ("table.key": value)."""
    return lambda tmp: _cfg(tmp, "bad.toml", **over)


def toml_text(text: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / "bad.toml").write_text(text)


def appended_toml(extra: str) -> Callable[[Path], None]:
    """A set-up writing ``bad.toml``: the tiny config and ``extra`` TOML text after it."""

    def setup(tmp: Path) -> None:
        path = _cfg(tmp, "bad.toml")
        path.write_text(path.read_text() + extra)

    return setup


def own(kind: str, path: str, write: Callable[[Path], None] | None, **task):
    """A set-up writing ``own.toml`` (``[task] dataset = "file"``) and the data file."""

    def setup(tmp: Path) -> None:
        if write is not None:
            write(tmp / path)
        over = {"task.kind": kind, "task.dataset": "file", "task.path": path}
        over.update({"task.n_train": None, "task.n_val": None, "task.n_test": None})
        over.update({f"task.{k}": v for k, v in task.items() if k != "model"})
        over["train.batch_size"] = 8
        if kind == "classification":
            over.update({"model.kind": task.get("model", "ode_mlp"), "model.width": 2})
        if kind == "forecast":  # own time series: an ODE-RNN
            over.update({"model.kind": "odernn", "model.width": 2})
        _cfg(tmp, "own.toml", **over)

    return setup


TS_HEAD = "@problemName x\n@timeStamps false\n@univariate true\n@classLabel true a b\n"


def text(content: str) -> Callable[[Path], None]:
    return lambda p: p.write_text(content)


def npy(arr, **kw) -> Callable[[Path], None]:
    return lambda p: np.save(p, arr, **kw)


def table(n: int = 30, cols: int = 3, header: str | None = None):
    rows = np.random.default_rng(0).normal(size=(n, cols))
    body = "".join(",".join(f"{v:.4f}" for v in r) + "\n" for r in rows)
    return text((header + "\n" if header else "") + body)


def labelled(n: int = 30) -> Callable[[Path], None]:
    rows = np.random.default_rng(1).normal(size=(n, 2))
    return text("".join(f"{a:.3f},{b:.3f},{i % 2}\n" for i, (a, b) in enumerate(rows)))


def damage(kind: str) -> Callable[[Path], None]:
    """A set-up replacing the copied run's checkpoint with a damaged or foreign one."""

    def setup(tmp: Path) -> None:
        path = tmp / CKPT
        data = path.read_bytes()
        if kind == "half":
            path.write_bytes(data[: len(data) // 2])
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "random":
            path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
        elif kind == "text":
            path.write_text("not a checkpoint\n")
        elif kind == "pickle":  # a plain pickle of something else
            path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
        elif kind == "foreign":  # a torch file of another program
            torch.save({"weights": torch.zeros(3)}, path)
        elif kind == "list":
            torch.save([1, 2, 3], path)
        elif kind == "schema":
            torch.save({**torch.load(path, weights_only=False), "schema": 99}, path)

    return setup


def write_file(name: str, content: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(content)

    return setup


def both(*setups) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for s in setups:
            s(tmp)

    return setup


# ----------------------------------------------------------------- patches (simulated faults)
def full_disk_at_save(n: int):
    """Patch ``torch.save`` to fail with ENOSPC from its ``n``-th call on."""

    def patch(monkeypatch, tmp: Path) -> None:
        real, calls = torch.save, {"n": 0}

        def save(obj, f, *a, **k):
            calls["n"] += 1
            if calls["n"] >= n:
                if hasattr(f, "write"):
                    f.write(b"PK\x03\x04 half a checkpoint")  # a part, then the disk is full
                raise OSError(28, "No space left on device")
            return real(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)

    return patch


class _FakeChild:
    """Stands for compare's child ``train``: a SIGTERM arrives while compare waits for it."""

    made: list[_FakeChild] = []

    def __init__(self, cmd, **kwargs):
        self.cmd, self.signals, self.returncode, self.waited = cmd, [], None, False
        _FakeChild.made.append(self)

    def poll(self):
        return self.returncode

    def send_signal(self, signum):
        self.signals.append(signum)

    def communicate(self):
        os.kill(os.getpid(), signal.SIGTERM)  # to compare itself, as `kill PID` would
        deadline = time.time() + 5
        while not self.signals and time.time() < deadline:
            time.sleep(0.01)  # the handler runs in this (the main) thread
        self.returncode, self.waited = -signal.SIGTERM, True
        return "", ""


def sigterm_during_compare(monkeypatch, tmp: Path) -> None:
    import node_ocp.train.compare as compare_mod

    _FakeChild.made = []
    monkeypatch.setattr(compare_mod.subprocess, "Popen", _FakeChild)


def interrupt_at_metrics(n: int):
    def patch(monkeypatch, tmp: Path) -> None:
        import node_ocp.train.loop as loop_mod

        real, calls = loop_mod._append_metrics, {"n": 0}

        def append(path, record):
            calls["n"] += 1
            if calls["n"] >= n:
                raise KeyboardInterrupt
            real(path, record)

        monkeypatch.setattr(loop_mod, "_append_metrics", append)

    return patch


def no_cuda(monkeypatch, tmp: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ----------------------------------------------------------------- checks after a case
def loads_checkpoint(rel: str, step: int | None = None):
    def check(tmp: Path, out: str) -> None:
        ckpt = torch.load(tmp / rel, map_location="cpu", weights_only=False)
        assert {"run", "model", "optimizer", "state"} <= set(ckpt), sorted(ckpt)
        if step is not None:
            assert ckpt["state"]["step"] == step, ckpt["state"]

    return check


def absent(*rels: str):
    def check(tmp: Path, out: str) -> None:
        for rel in rels:
            assert not (tmp / rel).exists(), rel

    return check


def json_field(rel: str, key: str, value):
    def check(tmp: Path, out: str) -> None:
        assert json.loads((tmp / rel).read_text())[key] == value

    return check


def child_got_sigterm_and_was_waited(tmp: Path, out: str) -> None:
    assert len(_FakeChild.made) == 1 and " ".join(_FakeChild.made[0].cmd).count(" train ") == 1
    child = _FakeChild.made[0]
    assert child.signals == [signal.SIGTERM] and child.waited
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # compare's handler is gone


def rows_kept(cfg: str, n: int, dim: int):
    def check(tmp: Path, out: str) -> None:
        from node_ocp.train import build_task, load_config

        data = build_task(load_config(tmp / cfg), "cpu").data
        assert len(data.train) + len(data.val) + len(data.test) == n
        assert data.train.x.shape[1] == dim

    return check


# ----------------------------------------------------------------- the command-line catalogue
@dataclass(frozen=True)
class Case:
    """One bad input or fault on the command line, and what the user must see."""

    name: str
    argv: list[str]
    setup: Callable[[Path], None] | None = None
    code: int = EXIT_USAGE
    names: str = ""  # the argument or key at fault, as the line says it
    accepts: str = ""  # what is accepted (or, for status 0/3, what the run line says)
    preserved: tuple[str, ...] = ()  # must exist before and keep their bytes
    changed: tuple[str, ...] = ()  # documented: replaced by the command
    appended: tuple[str, ...] = ()  # documented: may grow, the old bytes stay its start
    run: bool = False  # copy the shared finished run into {tmp}/run first
    patch: Callable | None = None  # (monkeypatch, tmp): a simulated fault
    check: Callable[[Path, str], None] | None = None  # (tmp, stdout): more assertions
    prefix: str = "node-ocp: error: "  # how the one line starts
    creates_nothing: bool = False  # no new file or folder appears, but for `leaves_empty`
    leaves_empty: str | None = None  # documented: this folder may be left, empty
    why: str | None = None  # the issue's "Why" item this case is
    ref: str | None = None  # the test that exercises the real fault
    marks: tuple = ()


_run_line = "done: "
CASES: list[Case] = [
    # --- runs overwritten
    Case(
        "train into a finished run",
        [*TRAIN, "--out", "{run}", "--lr", "0.01"],
        run=True,
        names="--out: ",
        accepts="--resume to continue that run, or --overwrite",
        preserved=tuple(f"run/{f}" for f in RUN_FILES),
        why="train overwrites a finished run",
    ),
    Case(
        "train of another config into a finished run",
        ["train", "{tmp}/bad.toml", "--no-progress", "--out", "{run}"],
        setup=config(**{"model.hidden": [6]}),
        run=True,
        names="--out: ",
        accepts="--overwrite",
        preserved=tuple(f"run/{f}" for f in RUN_FILES),
        why="train overwrites a finished run",
    ),
    Case(
        "train with the default --out onto the previous run",
        TRAIN,
        setup=lambda tmp: shutil.copytree(tmp / "run", tmp / "runs" / "tiny"),
        run=True,
        names="--out: 'runs/tiny' already holds a run",
        accepts="--resume",
        preserved=tuple(f"runs/tiny/{f}" for f in RUN_FILES),
        why="the default --out overwrites the previous run",
    ),
    Case(
        "train --overwrite replaces the run",
        [*TRAIN, "--out", "{run}", "--lr", "0.01", "--overwrite"],
        run=True,
        code=0,
        prefix=_run_line,
        names="done: 4 steps",
        accepts="run folder",
        changed=tuple(f"run/{f}" for f in RUN_FILES),
        check=json_field("run/config.json", "lr", 0.01),
    ),
    Case(
        "compare into a folder holding a comparison",
        ["compare", "{cfg}", "--optimizers", "adam", "--seeds", "1", "--out", "{tmp}/cmp"],
        setup=both(
            write_file("cmp/comparison.json", '{"optimizers": {}}'),
            write_file("cmp/report.md", "# my report\n"),
        ),
        names="--out: ",
        accepts="--resume to keep its finished runs, or --overwrite",
        preserved=("cmp/comparison.json", "cmp/report.md"),
        creates_nothing=True,
        why="compare replaces report.md",
    ),
    Case(
        "compare into a folder holding only runs",
        ["compare", "{cfg}", "--optimizers", "adam", "--seeds", "1", "--out", "{tmp}/cmp"],
        setup=write_file("cmp/runs/adam/lr0.05/seed0/metrics.jsonl", '{"step": 0}\n'),
        names="already holds a comparison (runs)",
        accepts="--overwrite",
        preserved=("cmp/runs/adam/lr0.05/seed0/metrics.jsonl",),
        creates_nothing=True,
    ),
    # --- output folders
    Case(
        "train --out under a file",
        [*TRAIN, "--out", "{tmp}/blocker/run"],
        setup=write_file("blocker", "x"),
        names="--out: cannot write to",
        accepts="a writable folder",
        preserved=("blocker",),
        creates_nothing=True,
    ),
    Case(
        "train --out onto a file",
        [*TRAIN, "--out", "{tmp}/blocker"],
        setup=write_file("blocker", "x"),
        names="--out: cannot write to",
        accepts="a writable folder",
        preserved=("blocker",),
        creates_nothing=True,
    ),
    Case(
        "compare --out under a file",
        ["compare", "{cfg}", "--optimizers", "adam", "--seeds", "1", "--out", "{tmp}/b/c"],
        setup=write_file("b", "x"),
        names="--out: cannot write to",
        accepts="a writable folder",
        preserved=("b",),
        creates_nothing=True,
    ),
    Case(
        "bench --out under a file",
        ["bench", "{cfg}", "--out", "{tmp}/b/bench.json", "--solver-loop", "0"],
        setup=write_file("b", "x"),
        names="--out: cannot write to",
        accepts="a writable folder",
        preserved=("b",),
        creates_nothing=True,
    ),
    Case(
        "bench --out onto a file that is not a bench output",
        ["bench", "{cfg}", "--out", "{tmp}/notes.json", "--solver-loop", "0"],
        setup=write_file("notes.json", '{"mine": true}'),
        names="--out: ",
        accepts="an earlier bench output, or --force",
        preserved=("notes.json",),
        creates_nothing=True,
    ),
    Case(
        "bench --out onto a folder",
        ["bench", "{cfg}", "--out", "{tmp}/somewhere", "--solver-loop", "0"],
        setup=write_file("somewhere/keep.txt", "mine"),
        names="--out: ",
        accepts="a JSON file path",
        preserved=("somewhere/keep.txt",),
        creates_nothing=True,
    ),
    Case(
        "--resume on a missing folder",
        [*TRAIN, "--out", "{tmp}/nothing/here", "--resume"],
        names="--resume: no checkpoint in",
        accepts="the --out folder of an earlier run",
        creates_nothing=True,
        check=absent("nothing"),
        why="--resume on a missing folder leaves a folder",
        ref="tests/test_cli.py::test_resume_on_a_missing_folder_creates_nothing",
    ),
    Case(
        "--resume on a folder without a checkpoint",
        [*TRAIN, "--out", "{tmp}/partial", "--resume"],
        setup=write_file("partial/metrics.jsonl", '{"step": 0}\n'),
        names="--resume: no checkpoint in",
        accepts="the --out folder of an earlier run",
        preserved=("partial/metrics.jsonl",),
        creates_nothing=True,
    ),
    # --- damaged or foreign checkpoints
    *[
        Case(
            f"--resume on a checkpoint: {what}",
            [*TRAIN, "--out", "{run}", "--resume"],
            setup=damage(kind),
            run=True,
            names="--resume: '{tmp}/run/checkpoint.pt'",
            accepts=accepts,
            preserved=tuple(f"run/{f}" for f in RUN_FILES),
            creates_nothing=True,
            why=why,
        )
        for kind, what, accepts, why in [
            (
                "half",
                "truncated to half",
                "is not a readable checkpoint",
                "--resume on a truncated checkpoint",
            ),
            ("empty", "empty", "is not a readable checkpoint", "--resume on an empty checkpoint"),
            ("random", "random bytes", "is not a readable checkpoint", "--resume on random bytes"),
            ("text", "text", "is not a readable checkpoint", "--resume on a text file"),
            ("pickle", "a plain pickle", "accepted: a checkpoint.pt written by node-ocp", None),
            ("foreign", "another program's torch file", "is not a node-ocp checkpoint", None),
            ("list", "a torch file of a list", "is not a node-ocp checkpoint", None),
            ("schema", "another schema", "accepted: schema 1", None),
        ]
    ],
    Case(
        "--resume with a changed config",
        ["train", "{tmp}/bad.toml", "--no-progress", "--out", "{run}", "--resume"],
        setup=config(**{"model.hidden": [6]}),
        run=True,
        names="written with config.model.hidden = [4], this run has [6]",
        accepts="accepted: the same config and choices",
        preserved=tuple(f"run/{f}" for f in RUN_FILES),
        creates_nothing=True,
        why="the resume mismatch does not name the key",
    ),
    Case(
        "--resume with another --lr",
        [*TRAIN, "--out", "{run}", "--resume", "--lr", "0.5"],
        run=True,
        names="written with lr = 0.05, this run has 0.5",
        accepts="accepted: the same config and choices",
        preserved=tuple(f"run/{f}" for f in RUN_FILES),
        creates_nothing=True,
    ),
    Case(
        "--resume with another --optimizer",
        [*TRAIN, "--out", "{run}", "--resume", "--optimizer", "ocnopt"],
        run=True,
        names="written with optimizer = 'adam', this run has 'ocnopt'",
        accepts="accepted: the same config and choices",
        preserved=tuple(f"run/{f}" for f in RUN_FILES),
        creates_nothing=True,
    ),
    Case(
        "--resume with a longer budget continues the run",
        [*TRAIN, "--out", "{run}", "--resume", "--max-steps", "6"],
        run=True,
        code=0,
        prefix=_run_line,
        names="done: 6 steps",
        accepts="run folder",
        appended=("run/metrics.jsonl",),
        changed=("run/checkpoint.pt", "run/best.pt", "run/summary.json", "run/config.json"),
        check=loads_checkpoint(CKPT, step=6),
    ),
    # --- faults while running
    Case(
        "a full disk at the second checkpoint",
        [*TRAIN, "--out", "{tmp}/fresh"],
        # torch.save calls: checkpoint.pt and best.pt at step 2, checkpoint.pt at step 4
        patch=full_disk_at_save(3),
        names="checkpoint: cannot write '{tmp}/fresh/checkpoint.pt' (No space left on device)",
        accepts="the previous checkpoint is kept: free space and continue with --resume",
        check=loads_checkpoint("fresh/checkpoint.pt", step=2),
        why="a full disk during a checkpoint",
        ref="tests/test_train.py::test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_"
        "previous",
    ),
    Case(
        "a full disk at the first checkpoint of a resumed run",
        [*TRAIN, "--out", "{run}", "--resume", "--max-steps", "6"],
        run=True,
        patch=full_disk_at_save(1),
        names="checkpoint: cannot write",
        accepts="the previous checkpoint is kept",
        preserved=(CKPT, "run/summary.json"),
        appended=("run/metrics.jsonl",),
        changed=("run/config.json",),  # the resumed run's budget, rewritten at its start
        check=loads_checkpoint(CKPT, step=4),
        why="a full disk during a checkpoint",
    ),
    Case(
        "SIGTERM to compare while its child trains",
        [
            "compare",
            "{cfg}",
            "--optimizers",
            "adam",
            "--seeds",
            "1",
            "--out",
            "{tmp}/cmp",
            "--no-progress",
        ],
        patch=sigterm_during_compare,
        code=128 + signal.SIGTERM,
        prefix="node-ocp: ",
        names="SIGTERM",
        accepts="--resume",
        check=child_got_sigterm_and_was_waited,
        why="SIGTERM to compare orphans its child",
        ref="tests/test_cli.py::test_sigterm_to_compare_reaches_its_child_run",
    ),
    Case(
        "Ctrl-C during train",
        [*TRAIN, "--out", "{tmp}/fresh"],
        patch=interrupt_at_metrics(3),  # after the log lines of steps 0 and 2
        code=130,
        prefix="node-ocp: interrupted",
        names="interrupted",
        accepts="train --resume continues",
        check=loads_checkpoint("fresh/checkpoint.pt", step=2),
    ),
    Case(
        "a diverged train",
        [*TRAIN, "--out", "{tmp}/wild", "--lr", "1e6"],
        code=EXIT_DIVERGED,
        prefix="diverged: ",
        names="diverged: ",
        accepts=f"exit status {EXIT_DIVERGED}",
        check=json_field("wild/summary.json", "diverged", True),
        why="a diverged train exits 0",
        ref="tests/test_cli.py::test_a_diverged_run_exits_with_its_documented_status",
    ),
    Case(
        "batch_size larger than the training split",
        ["train", "{tmp}/bad.toml", "--no-progress", "--out", "{tmp}/r"],
        setup=config(**{"train.batch_size": 1000}),
        names="[train].batch_size: received 1000 for a training split of 64 examples",
        accepts="accepted: an int <= 64",
        creates_nothing=True,
        why="batch_size larger than the data",
    ),
    # --- flags
    Case(
        "--lr 0",
        [*TRAIN, "--out", "{tmp}/r", "--lr", "0"],
        names="--lr: received 0.0",
        accepts="accepted: a finite float > 0",
        creates_nothing=True,
    ),
    Case(
        "--lr not a number",
        [*TRAIN, "--out", "{tmp}/r", "--lr", "fast"],
        names="--lr",
        accepts="float",
        creates_nothing=True,
    ),
    Case(
        "--max-steps 0",
        [*TRAIN, "--out", "{tmp}/r", "--max-steps", "0"],
        names="--max-steps",
        accepts="accepted: an int >= 1",
        creates_nothing=True,
    ),
    Case(
        "--max-time -1",
        [*TRAIN, "--out", "{tmp}/r", "--max-time", "-1"],
        names="--max-time",
        accepts="accepted: a number >= 0",
        creates_nothing=True,
    ),
    Case(
        "--seeds 0",
        ["compare", "{cfg}", "--seeds", "0", "--out", "{tmp}/c"],
        names="--seeds",
        accepts="accepted: an int >= 1",
        creates_nothing=True,
    ),
    Case(
        "bench --steps 0",
        ["bench", "{cfg}", "--steps", "0", "--out", "{tmp}/b.json"],
        names="--steps",
        accepts="accepted: an int >= 1",
        creates_nothing=True,
    ),
    Case(
        "--device tpu",
        [*TRAIN, "--out", "{tmp}/r", "--device", "tpu"],
        names="--device",
        accepts="'cpu', 'cuda', 'auto'",
        creates_nothing=True,
    ),
    Case(
        "train --device cuda without a GPU",
        [*TRAIN, "--out", "{tmp}/r", "--device", "cuda"],
        patch=no_cuda,
        names="--device: received 'cuda' but no CUDA GPU",
        accepts="cpu",
        creates_nothing=True,
    ),
    Case(
        "compare --device cuda without a GPU",
        ["compare", "{cfg}", "--device", "cuda", "--seeds", "1", "--out", "{tmp}/c"],
        patch=no_cuda,
        names="--device: received 'cuda' but no CUDA GPU",
        accepts="cpu",
        creates_nothing=True,
    ),
    Case(
        "an unknown flag",
        [*TRAIN, "--out", "{tmp}/r", "--stpes", "3"],
        names="--stpes",
        accepts="--help",
        creates_nothing=True,
    ),
    Case(
        "an unknown command",
        ["trian", "{cfg}"],
        names="'trian'",
        accepts="'train', 'compare', 'bench', 'plot'",
        creates_nothing=True,
    ),
    Case("no command", [], names="COMMAND", accepts="train", creates_nothing=True),
    Case(
        "train --optimizer unknown",
        [*TRAIN, "--out", "{tmp}/r", "--optimizer", "rmsprop"],
        names="--optimizer: received 'rmsprop'",
        accepts="'adam', 'ocnopt'",
        creates_nothing=True,
    ),
    Case(
        "compare --optimizers unknown",
        ["compare", "{cfg}", "--optimizers", "adam,lbfgs", "--out", "{tmp}/c"],
        names="--optimizers: received 'lbfgs'",
        accepts="'adam', 'ocnopt'",
        creates_nothing=True,
    ),
    Case(
        "compare --optimizers empty",
        ["compare", "{cfg}", "--optimizers", ",", "--out", "{tmp}/c"],
        names="--optimizers: received nothing",
        accepts="names like adam",
        creates_nothing=True,
    ),
    Case(
        "compare --optimizers twice the same",
        ["compare", "{cfg}", "--optimizers", "adam,adam", "--out", "{tmp}/c"],
        names="--optimizers: received duplicates",
        accepts="adam,adam",
        creates_nothing=True,
    ),
    Case(
        "bench --optimizers unknown",
        ["bench", "{cfg}", "--optimizers", "lbfgs", "--out", "{tmp}/b.json"],
        names="--optimizers: received 'lbfgs'",
        accepts="'adam', 'ocnopt'",
        creates_nothing=True,
    ),
    # --- config files
    Case(
        "a missing config",
        ["train", "{tmp}/nope.toml", "--out", "{tmp}/r"],
        names="nope.toml",
        accepts="is not a file",
        creates_nothing=True,
    ),
    Case(
        "config: a class path with a misspelt keyword in args",
        ["train", "{tmp}/bad.toml", "--no-progress", "--out", "{tmp}/r"],
        setup=appended_toml(
            "[optimizers.x]\nkind = 'torch.optim.AdamW'\nargs = {weight_decya = 0.1}\n"
        ),
        names="[optimizers.x].args.weight_decya",
        accepts="weight_decay",
        preserved=("bad.toml",),
        creates_nothing=True,
    ),
    Case(
        "config: args without a class path",
        ["train", "{tmp}/bad.toml", "--no-progress", "--out", "{tmp}/r"],
        setup=appended_toml("[optimizers.x]\nkind = 'adam'\nargs = {betas = [0.9, 0.99]}\n"),
        names="[optimizers.x].args: received",
        accepts="args only with a class-path kind",
        preserved=("bad.toml",),
        creates_nothing=True,
    ),
    Case(
        "a config that is not TOML",
        ["train", "{tmp}/bad.toml", "--out", "{tmp}/r"],
        setup=toml_text("[task]\nkind = \n"),
        names="bad.toml",
        accepts="is not valid TOML",
        preserved=("bad.toml",),
        creates_nothing=True,
    ),
    *[
        Case(
            f"config: {what}",
            ["train", "{tmp}/bad.toml", "--no-progress", "--out", "{tmp}/r"],
            setup=config(**over),
            names=names,
            accepts=accepts,
            preserved=("bad.toml",),
            creates_nothing=True,
        )
        for what, over, names, accepts in [
            ("an unknown table", {"trian.steps": 3}, "unknown table [trian]", "[task]"),
            ("an unknown key", {"train.stepz": 3}, "[train]: unknown key 'stepz'", "steps"),
            ("a wrong type", {"train.steps": "many"}, "[train].steps: received 'many'", "an int"),
            ("a float for an int", {"train.steps": 2.5}, "[train].steps: received 2.5", "an int"),
            ("a bool for an int", {"train.steps": True}, "[train].steps: received", "an int"),
            ("out of range", {"train.steps": 0}, "[train].steps: received 0", "an int >= 1"),
            (
                "a negative kl_clip",
                {"optimizers.ocnopt.kl_clip": -1.0},
                "[optimizers.ocnopt].kl_clip: received -1.0",
                "a float >= 0",
            ),
            ("horizon beta 1", {"horizon.beta": 1.0}, "[horizon].beta: received 1.0", "[0, 1)"),
            (
                "a bad choice",
                {"solver.method": "euler2"},
                "[solver].method: received 'euler2'",
                "'dopri5'",
            ),
            (
                "a bad task kind",
                {"task.kind": "regression"},
                "[task].kind: received 'regression'",
                "'density'",
            ),
            (
                "a model for another task",
                {"model.kind": "image"},
                "[model].kind: received 'image'",
                "'cnf'",
            ),
            (
                "an unknown dataset",
                {"task.dataset": "mnist"},
                "[task].dataset: received 'mnist'",
                "8gaussians",
            ),
            (
                "an unknown [train].optimizer",
                {"train.optimizer": "lbfgs"},
                "[train].optimizer: received 'lbfgs'",
                "'adam'",
            ),
            (
                "an unknown optimizer kind",
                {"optimizers.x.kind": "rmsprop"},
                "[optimizers.x].kind: received 'rmsprop'",
                "a class path",
            ),
            (
                "a bad curvature",
                {"optimizers.ocnopt.curvature": "full"},
                "[optimizers.ocnopt].curvature: received 'full'",
                "'kfac'",
            ),
            (
                "a class path that does not import",
                {"optimizers.x.kind": "torch.optim.Adamm"},
                "[optimizers.x].kind: received 'torch.optim.Adamm'",
                "accepted: a class path",
            ),
            (
                "a class path of no optimizer",
                {"optimizers.x.kind": "torch.nn.Linear"},
                "[optimizers.x].kind: received 'torch.nn.Linear'",
                "torch.optim.Optimizer",
            ),
            (
                "a class path with a misspelt keyword",
                {"optimizers.x.kind": "torch.optim.AdamW", "optimizers.x.momentum": 0.9},
                "[optimizers.x].momentum: received 0.9",
                "args = {{momentum = ...}}",
            ),
            (
                "a bad schedule",
                {"optimizers.adam.schedule": "sometimes"},
                "[optimizers.adam].schedule: received 'sometimes'",
                "accepted: one of",
            ),
        ]
    ],
    # --- own data: [task] dataset = "file"
    Case(
        "own data: a missing file",
        ["train", "{tmp}/own.toml", "--no-progress", "--out", "{tmp}/r"],
        setup=own("density", "absent.csv", None),
        names="[task].path: no file at",
        accepts="an existing file",
        creates_nothing=True,
        why="no own data on the command line",
    ),
    Case(
        "own data: a single-column CSV trains",
        ["train", "{tmp}/own.toml", "--no-progress", "--out", "{tmp}/r", "--max-steps", "2"],
        setup=own("density", "one.csv", table(30, 1)),
        code=0,
        prefix=_run_line,
        names="done: 2 steps",
        accepts="run folder",
        check=rows_kept("own.toml", 30, 1),
        why="a single-column CSV is refused",
    ),
    Case(
        "own data: IDX images under MNIST's own file names train",
        ["train", "{tmp}/own.toml", "--no-progress", "--out", "{tmp}/r", "--max-steps", "1"],
        setup=both(
            own(
                "classification",
                "train-images-idx3-ubyte",
                lambda p: _write_idx(p, np.random.default_rng(0).integers(0, 256, (40, 6, 6))),
                labels_path="train-labels.idx1-ubyte",
                model="image",
            ),
            lambda tmp: _write_idx(tmp / "train-labels.idx1-ubyte", np.arange(40) % 2),
        ),
        preserved=("train-images-idx3-ubyte", "train-labels.idx1-ubyte"),
        code=0,
        prefix=_run_line,
        names="done: 1 steps",
        accepts="val accuracy",
    ),
    Case(
        "own data: a labelled table trains",
        ["train", "{tmp}/own.toml", "--no-progress", "--out", "{tmp}/r", "--max-steps", "2"],
        setup=own("classification", "lab.csv", labelled(30)),
        code=0,
        prefix=_run_line,
        names="done: 2 steps",
        accepts="val accuracy",
        why="no own data on the command line",
    ),
    Case(
        "own data: the bundled own_table config trains",
        [
            "train",
            str(ROOT / "configs" / "own_table.toml"),
            "--no-progress",
            "--out",
            "{tmp}/r",
            "--max-steps",
            "1",
            "--optimizer",
            "adam",
        ],
        code=0,
        prefix=_run_line,
        names="done: 1 steps",
        accepts="run folder",
        why="no own data on the command line",
    ),
    *[
        Case(
            f"own data: {what}",
            ["train", "{tmp}/own.toml", "--no-progress", "--out", "{tmp}/r"],
            setup=own(kind, path, write, **task),
            names=names,
            accepts=accepts,
            preserved=("own.toml", path),
            creates_nothing=True,
            why=why,
        )
        for what, kind, path, write, task, names, accepts, why in [
            (
                "a first row that fails to parse",
                "density",
                "d.csv",
                text("1,x,3\n4,5,6\n" * 6),
                {},
                "[task].path: d.csv line 1 column 2: cannot read 'x'",
                "accepted: numbers",
                "a first row that fails to parse is dropped as a header",
            ),
            (
                "a ragged row",
                "density",
                "d.csv",
                text("1,2,3\n4,5\n" + "1,2,3\n" * 12),
                {},
                "[task].path: d.csv line 2 has 2 columns, 13 of the 14 rows have 3",
                "accepted: every row with the same columns",
                "a ragged row is dropped",
            ),
            (
                "a text cell",
                "density",
                "d.csv",
                text("a,b\n" + "1,2\n" * 5 + "3,q\n" + "1,2\n" * 6),
                {},
                "[task].path: d.csv line 7 column 2: cannot read 'q'",
                "accepted: numbers",
                "a text cell gives numpy's message without file and line",
            ),
            (
                "a complex .npy",
                "density",
                "c.npy",
                npy(np.ones((20, 2), np.complex64)),
                {},
                "[task].path: c.npy holds a complex64 array",
                "accepted: real numbers",
                "a complex .npy loses its imaginary part",
            ),
            (
                "an object .npy",
                "density",
                "o.npy",
                npy(np.array([[1, "a"]] * 12, dtype=object), allow_pickle=True),
                {},
                "[task].path: o.npy holds an object (pickled) array",
                "accepted: real numbers",
                None,
            ),
            (
                "a truncated .npy",
                "density",
                "t.npy",
                lambda p: (np.save(p, np.zeros((40, 3))), p.write_bytes(p.read_bytes()[:150])),
                {},
                "[task].path: t.npy",
                "numpy.save",
                None,
            ),
            (
                "a text file named .npz",
                "density",
                "t.npz",
                text("1,2\n"),
                {},
                "[task].path: t.npz",
                "numpy.savez",
                None,
            ),
            (
                "a 3-D .npy",
                "density",
                "b.npy",
                npy(np.zeros((12, 3, 4))),
                {},
                "[task].path: b.npy holds an array of shape (12, 3, 4)",
                "accepted: a 2-D table",
                None,
            ),
            (
                "non-finite values",
                "density",
                "n.npy",
                npy(np.array([[1.0, np.nan]] * 12)),
                {},
                "[task].path: values in n.npy: 12 non-finite values",
                "accepted: finite numbers",
                None,
            ),
            (
                "too few rows",
                "density",
                "s.csv",
                table(5, 2),
                {},
                "[task].path: s.csv holds 5 rows",
                "accepted: >= 10",
                None,
            ),
            (
                "a binary file named .csv",
                "density",
                "x.csv",
                lambda p: p.write_bytes(bytes(range(256))),
                {},
                "[task].path: x.csv is not a text file",
                "accepted: a UTF-8 CSV",
                None,
            ),
            (
                "another suffix",
                "density",
                "d.txt",
                table(),
                {},
                "[task].path: received",
                "accepted: a .csv, .npy or .npz file",
                None,
            ),
            (
                "header = 'yes'",
                "density",
                "d.csv",
                table(),
                {"header": "yes"},
                "[task].header: received 'yes'",
                "'auto', 'true', 'false'",
                None,
            ),
            (
                "header = false on a file with a header",
                "density",
                "d.csv",
                table(20, 2, "a,b"),
                {"header": "false"},
                "[task].path: d.csv line 1 column 1: cannot read 'a'",
                "header=True",
                None,
            ),
            (
                "label_column out of range",
                "classification",
                "lab.csv",
                labelled(),
                {"label_column": 5},
                "[task].label_column: received 5 for lab.csv with 3 columns",
                "accepted: an int in [-3, 2]",
                None,
            ),
            (
                "a label column of floats",
                "classification",
                "d.csv",
                table(20, 3),
                {},
                "[task].label_column: column 3 of d.csv holds non-integer values",
                "accepted: integer class labels",
                None,
            ),
            (
                "a single column for classification",
                "classification",
                "one.csv",
                table(20, 1),
                {},
                "[task].label_column: received -1 for one.csv with 1 columns",
                ">= 2 columns",
                None,
            ),
            (
                "IDX images with a short header",
                "classification",
                "img-ubyte",
                lambda p: p.write_bytes(bytes([0, 0, 8, 3, 0, 0])),
                {"model": "image"},
                "[task].path: img-ubyte",
                "accepted: an IDX file",
                None,
            ),
            (
                "a .gz that is not gzip",
                "classification",
                "img-ubyte.gz",
                text("plain"),
                {"model": "image"},
                "[task].path: img-ubyte.gz",
                "accepted: an IDX file",
                None,
            ),
            (
                "a series CSV without a time column",
                "classification",
                "s.csv",
                text("series,t,a,label\ns1,0,1,x\n"),
                {"model": "odernn"},
                "[task].path: s.csv line 1: no column named 'time' in the header",
                "accepted: a header row with columns series, time",
                "no own data on the command line",
            ),
            (
                "a series time given twice",
                "classification",
                "s.csv",
                text(
                    "series,time,a,label\n"
                    + "".join(f"s{i},0,1,x\ns{i},1,2,x\n" for i in range(12))
                    + "s1,1,3,x\n"
                ),
                {"model": "odernn"},
                "[task].path: s.csv line 26 column 2 ('time'): time 1.0 of series 's1' again",
                "accepted: one row per series and time",
                "no own data on the command line",
            ),
            (
                "a label that changes within a series",
                "classification",
                "s.csv",
                text(
                    "series,time,a,label\n"
                    + "".join(f"s{i},0,1,x\ns{i},1,2,x\n" for i in range(12))
                    + "s1,2,3,y\n"
                ),
                {"model": "cde"},
                "[task].path: s.csv line 26 column 4 ('label'): label 'y' for series 's1'",
                "accepted: one label per series",
                "no own data on the command line",
            ),
            (
                "a text cell in a series CSV",
                "forecast",
                "s.csv",
                text(
                    "series,time,a,label\n"
                    + "".join(f"s{i},0,1,x\ns{i},1,2,x\n" for i in range(12))
                    + "s1,2,zz,x\n"
                ),
                {},
                "[task].path: s.csv line 26 column 3 ('a'): cannot read 'zz'",
                "accepted: a finite number, or an empty cell",
                "no own data on the command line",
            ),
            (
                "too few series",
                "forecast",
                "s.csv",
                text("series,time,a\ns1,0,1\ns1,1,2\ns2,0,1\ns2,1,2\n"),
                {},
                "[task].path: s.csv holds 2 series",
                "accepted: >= 3",
                "no own data on the command line",
            ),
            (
                "columns naming a column the file lacks",
                "forecast",
                "s.csv",
                text("patient,hour,a\n" + "".join(f"p{i},0,1\np{i},1,2\n" for i in range(9))),
                {"columns": {"series": "patient", "time": "hours"}},
                "[task].columns: time = 'hours' is not a column of s.csv",
                "accepted: a column name of the header",
                "no own data on the command line",
            ),
            (
                "an unknown .ts tag",
                "classification",
                "x.ts",
                text(TS_HEAD + "@bogus 1\n@data\n1,2,3:a\n"),
                {"model": "odernn"},
                "[task].path: x.ts line 5: unknown tag '@bogus'",
                "accepted: @problemName",
                "no own data on the command line",
            ),
            (
                "a bad .ts value",
                "classification",
                "x.ts",
                text(TS_HEAD + "@data\n1,2,3:a\n1,q,3:b\n"),
                {"model": "odernn"},
                "[task].path: x.ts line 7 dimension 1 value 2: cannot read 'q'",
                "accepted: a finite number, ? or NaN",
                "no own data on the command line",
            ),
        ]
    ],
    Case(
        "own data: dataset = 'file' without a path",
        ["train", "{tmp}/bad.toml", "--out", "{tmp}/r"],
        setup=config(**{"task.dataset": "file"}),
        names="[task].path: received nothing with dataset = 'file'",
        accepts="accepted: the path of a .csv",
        creates_nothing=True,
    ),
    Case(
        "own data: a path without dataset = 'file'",
        ["train", "{tmp}/bad.toml", "--out", "{tmp}/r"],
        setup=config(**{"task.path": "d.csv"}),
        names="[task].path: received 'd.csv' with dataset '8gaussians'",
        accepts="accepted: a path only with dataset = 'file'",
        creates_nothing=True,
    ),
    # --- plot
    Case(
        "plot on a corrupt comparison.json",
        ["plot", "{tmp}/cmp"],
        setup=write_file("cmp/comparison.json", '{"optimizers": '),
        names="RUN_DIR: '{tmp}/cmp/comparison.json' is not a readable comparison",
        accepts="accepted: the comparison.json node-ocp compare wrote",
        preserved=("cmp/comparison.json",),
        creates_nothing=True,
        why="plot on a corrupt comparison.json",
        ref="tests/test_cli.py::test_plot_on_a_corrupt_comparison_names_the_file",
    ),
    Case(
        "plot on a comparison.json of another shape",
        ["plot", "{tmp}/cmp"],
        setup=write_file("cmp/comparison.json", '{"optimizers": {"adam": 1}}'),
        names="RUN_DIR: '{tmp}/cmp/comparison.json' is not a readable comparison",
        accepts="accepted: the comparison.json node-ocp compare wrote",
        preserved=("cmp/comparison.json",),
        creates_nothing=True,
    ),
    Case(
        "plot on a missing folder",
        ["plot", "{tmp}/absent"],
        names="RUN_DIR: '{tmp}/absent' is not a folder",
        accepts="accepted: a run or comparison folder",
        creates_nothing=True,
    ),
    Case(
        "plot on a folder of something else",
        ["plot", "{tmp}/misc"],
        setup=write_file("misc/notes.txt", "mine"),
        names="RUN_DIR: '{tmp}/misc' holds neither comparison.json nor metrics.jsonl",
        accepts="accepted: a folder written by node-ocp compare or node-ocp train",
        preserved=("misc/notes.txt",),
        creates_nothing=True,
    ),
    Case(
        "plot on a run with a corrupt config.json",
        ["plot", "{run}"],
        setup=write_file("run/config.json", "{not json"),
        run=True,
        names="config.json",
        accepts="accepted: ",
        preserved=tuple(f"run/{f}" for f in RUN_FILES),
        creates_nothing=True,
    ),
    Case(
        "plot on a finished run redraws its figures",
        ["plot", "{run}"],
        run=True,
        code=0,
        prefix="{tmp}/run/curves.png",
        names="{tmp}/run/",
        accepts="curves.png",
        preserved=tuple(f"run/{f}" for f in RUN_FILES),
        check=lambda tmp, out: (tmp / "run" / "curves.png").stat().st_size > 1000,
    ),
]


# ----------------------------------------------------------------- running a case
RESULTS: dict[str, dict] = {}


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``, by relative path."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = None if p.is_dir() else p.read_bytes()
    return out


def run_cli(argv: list[str]) -> int:
    """``main(argv)``'s exit status (argparse's usage errors end in SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished tiny run (4 steps, checkpoints at 2 and 4), copied into cases."""
    d = tmp_path_factory.mktemp("finished")
    cfg = _cfg(d)
    out = d / "run"
    assert run_cli(["train", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
    return out


def _param(c: Case):
    return pytest.param(c, id=c.name.replace(" ", "_"), marks=c.marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_cli_case(case: Case, finished, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NODE_OCP_TRACEBACK", raising=False)
    _cfg(tmp_path)
    if case.run:
        shutil.copytree(finished, tmp_path / "run")
    if case.setup is not None:
        case.setup(tmp_path)
    if case.patch is not None:
        case.patch(monkeypatch, tmp_path)
    fill = {"tmp": str(tmp_path), "cfg": str(tmp_path / "tiny.toml"), "run": str(tmp_path / "run")}
    argv = [a.format(**fill) for a in case.argv]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    code = run_cli(argv)
    out, err = capsys.readouterr()
    monkeypatch.undo()  # the real torch.save, Popen, ... for the checks below
    after = _snapshot(tmp_path)

    if case.code in (0, EXIT_DIVERGED):  # the run's own line on stdout, stderr quiet
        prefix = case.prefix.format(**fill)
        lines = [ln for ln in out.splitlines() if ln.startswith(prefix)]
        one_line = err.strip() == "" and len(lines) >= 1
        line = lines[-1] if lines else ""
    else:
        lines = err.strip().splitlines()
        one_line = len(lines) == 1 and lines[0].startswith(case.prefix)
        line = lines[0] if lines else ""
    lost = []
    for rel, data in before.items():
        if rel in case.changed:
            continue
        now = after.get(rel, b"<gone>")
        if data is None:
            kept = rel in after
        elif rel in case.appended:
            kept = isinstance(now, bytes) and now.startswith(data)
        else:
            kept = now == data
        if not kept:
            lost.append(rel)
    created = sorted(set(after) - set(before))
    RESULTS[case.name] = {
        "code": code,
        "one_line": one_line,
        "lost": lost,
        "line": line,
        "created": created,
    }

    assert code == case.code, (code, out, err)
    assert "Traceback" not in err, err
    assert one_line, f"stderr: {err!r}\nstdout: {out[-2000:]!r}"
    assert case.names.format(**fill) in line, line
    assert case.accepts.format(**fill) in line, line
    for rel in case.preserved:
        assert before.get(rel) is not None, f"{rel} is not there before the case"
    assert lost == [], f"lost or changed: {lost}"
    if case.creates_nothing:
        assert set(created) <= {case.leaves_empty}, f"created: {created}"
    if case.check is not None:
        case.check(tmp_path, out)


# ----------------------------------------------------------------- the library catalogue
def _ocnopt_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(no.ODEBlock(mlp_field(3, width)), nn.Linear(3, 2)).double()


def _ocnopt_state(width: int = 16, **kw) -> dict:
    model = _ocnopt_model(width)
    opt = no.OCNOpt(model, **kw)
    x, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    ocnopt_step(opt, lambda: ((0.5 * (model(x) - t).pow(2).sum(1).mean()), None))
    return opt.state_dict()


def _horizon(width: int) -> no.HorizonOptimizer:
    torch.manual_seed(0)
    f = mlp_field(2, width)
    return no.HorizonOptimizer(no.ODEBlock(f, (0.0, 1.0)), f.parameters(), lr=0.1, penalty=0.01)


def _load_ocnopt(state: dict, width: int = 16, **kw):
    """The call loading ``state`` into an OCNOpt of a ``width``-wide model."""
    return lambda: no.OCNOpt(_ocnopt_model(width), **kw).load_state_dict(state)


def _load_horizon(state: dict, width: int, keep: int | None = None):
    """The call loading ``state`` (its first ``keep`` snapshots) into a controller of a
    ``width``-wide field."""
    if keep is not None:
        state = {**state, "prev": state["prev"][:keep]}
    return lambda: _horizon(width).load_state_dict(state)


def _write_idx(p: Path, arr: np.ndarray) -> None:
    import struct

    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    p.write_bytes(header + arr.astype(np.uint8).tobytes())


@dataclass(frozen=True)
class LibCase:
    """A library call on bad input: the error type and words of its first line."""

    name: str
    call: Callable[[Path], Callable[[], object]]  # writes files into tmp, returns the call
    exc: type | tuple[type, ...]
    words: tuple[str, ...]
    why: str | None = None
    marks: tuple = field(default=())


def _csv(content: str, **kw):
    def make(tmp: Path):
        (tmp / "t.csv").write_text(content)
        return lambda: load_tabular_file(tmp / "t.csv", **kw)

    return make


def _file(name: str, write: Callable[[Path], None], fn=load_tabular_file, **kw):
    def make(tmp: Path):
        write(tmp / name)
        return lambda: fn(tmp / name, **kw)

    return make


LIB_CASES: list[LibCase] = [
    LibCase(
        "csv first row 1,x,3",
        _csv("1,x,3\n4,5,6\n"),
        ValueError,
        ("path: t.csv line 1 column 2: cannot read 'x' as a number",),
        why="a first row that fails to parse is dropped as a header",
    ),
    LibCase(
        "csv ragged row",
        _csv("1,2,3\n4,5\n"),
        ValueError,
        ("path: t.csv line 2 has 2 columns, 1 of the 2 rows have 3",),
        why="a ragged row is dropped",
    ),
    LibCase(
        "csv text cell",
        _csv("a,b\n1,2\n3,q\n"),
        ValueError,
        ("path: t.csv line 3 column 2: cannot read 'q'", "accepted: numbers"),
        why="a text cell gives numpy's message without file and line",
    ),
    LibCase(
        "csv text cell after blank lines",
        _csv("1,2\n\n\n3,q\n"),
        ValueError,
        ("path: t.csv line 4 column 2: cannot read 'q'",),
    ),
    LibCase("csv empty", _csv(""), ValueError, ("path: t.csv holds no rows",)),
    LibCase(
        "csv header only",
        _csv("a,b\n"),
        ValueError,
        ("path: t.csv holds a header and no data rows",),
    ),
    LibCase(
        "csv header option 'yes'",
        _csv("1,2\n", header="yes"),
        ValueError,
        ("header: received 'yes'", "accepted: 'auto', True or False"),
    ),
    LibCase(
        "csv header option 1",
        _csv("1,2\n", header=1),
        ValueError,
        ("header: received 1", "accepted: 'auto', True or False"),
    ),
    LibCase(
        "csv header=False on a header",
        _csv("a,b\n1,2\n", header=False),
        ValueError,
        ("path: t.csv line 1 column 1: cannot read 'a'",),
    ),
    LibCase(
        "missing file",
        _file("absent.csv", lambda p: None),
        FileNotFoundError,
        ("path: no file at", "absent.csv", "accepted: an existing file"),
    ),
    LibCase(
        "complex .npy",
        _file("c.npy", npy(np.ones((3, 2), np.complex64))),
        ValueError,
        ("path: c.npy holds a complex64 array", "accepted: real numbers"),
        why="a complex .npy loses its imaginary part",
    ),
    LibCase(
        "object .npy",
        _file("o.npy", npy(np.array([[1, "a"]], object), allow_pickle=True)),
        ValueError,
        ("path: o.npy holds an object (pickled) array",),
    ),
    LibCase(
        "string .npy",
        _file("s.npy", npy(np.array([["a", "b"]]))),
        ValueError,
        ("path: s.npy holds a <U1 array", "accepted: real numbers"),
    ),
    LibCase(
        "truncated .npy",
        _file(
            "t.npy", lambda p: (np.save(p, np.zeros((40, 3))), p.write_bytes(p.read_bytes()[:150]))
        ),
        ValueError,
        ("path: t.npy is not a readable .npy file", "numpy.save"),
    ),
    LibCase(
        "text named .npy",
        _file("t.npy", text("hello\n")),
        ValueError,
        ("path: t.npy is not a readable .npy file", "numpy.save"),
    ),
    LibCase(
        "text named .npz",
        _file("t.npz", text("hello\n")),
        ValueError,
        ("path: t.npz is not a readable .npz file", "numpy.savez"),
    ),
    LibCase(
        "object array in .npz",
        _file("o.npz", lambda p: np.savez(p, x=np.array([[1, "a"]], object))),
        ValueError,
        ("path: o.npz holds an object (pickled) array",),
    ),
    LibCase(
        "npz with two arrays, no x",
        _file("two.npz", lambda p: np.savez(p, a=np.zeros(3), b=np.zeros(3))),
        ValueError,
        ("path: received", "accepted: an .npz with an array 'x' or a single array"),
    ),
    LibCase(
        "3-D .npy",
        _file("b.npy", npy(np.zeros((2, 3, 4)))),
        ValueError,
        ("path: b.npy holds an array of shape (2, 3, 4)", "accepted: a 2-D table"),
    ),
    LibCase(
        "NaN in .npy",
        _file("n.npy", npy(np.array([[1.0, np.nan]]))),
        ValueError,
        ("values in n.npy: 1 non-finite values", "accepted: finite numbers"),
    ),
    LibCase(
        "label_column out of range",
        _file("l.csv", labelled(20), file_classification, label_column=5),
        ValueError,
        ("label_column: received 5 for l.csv with 3 columns", "accepted: an int in [-3, 2]"),
    ),
    LibCase(
        "IDX short header",
        _file("i-ubyte", lambda p: p.write_bytes(bytes([0, 0, 8, 3])), load_image_file),
        ValueError,
        ("path: i-ubyte", "accepted: an IDX file"),
    ),
    LibCase(
        "IDX not gzip",
        _file("i-ubyte.gz", text("plain"), load_image_file),
        ValueError,
        ("path: i-ubyte.gz", "accepted: an IDX file"),
    ),
    LibCase(
        "IDX truncated body",
        _file("i-ubyte", lambda p: p.write_bytes(_idx_bytes((10, 5, 5))[:40]), load_image_file),
        ValueError,
        ("path: i-ubyte declares shape (10, 5, 5) but holds",),
    ),
    LibCase(
        "IDX labels of another length",
        lambda tmp: (
            _write_idx(tmp / "i-ubyte", np.zeros((4, 3, 3))),
            _write_idx(tmp / "l-ubyte", np.zeros(3)),
            lambda: load_image_file(tmp / "i-ubyte", tmp / "l-ubyte"),
        )[-1],
        ValueError,
        ("labels: shape (3,) for 4 images", "accepted: (4,)"),
    ),
    LibCase(
        "OCNOpt state of a 16-wide model into a 32-wide one",
        lambda tmp: _load_ocnopt(_ocnopt_state(16), 32),
        ValueError,
        ('state_dict: received "parameter', "accepted: shape (32, 3)"),
        why="OCNOpt state of a 16-wide model loads into a 32-wide one",
    ),
    LibCase(
        "OCNOpt state of another curvature",
        lambda tmp: _load_ocnopt(_ocnopt_state(16), 16, curvature="diagonal"),
        ValueError,
        ("state_dict: received \"curvature='ekfac'\"", "'diagonal'"),
    ),
    LibCase(
        "OCNOpt state from Adam",
        lambda tmp: _load_ocnopt(torch.optim.Adam(_ocnopt_model(16).parameters()).state_dict()),
        ValueError,
        ("state_dict: received", "accepted: a dict from OCNOpt.state_dict()"),
    ),
    LibCase(
        "HorizonOptimizer state of an 8-wide model into a 16-wide one",
        lambda tmp: _load_horizon(_horizon(8).state_dict(), 16),
        ValueError,
        ("state_dict: received", "parameter #0", "accepted: shape (16, 2)"),
    ),
    LibCase(
        "HorizonOptimizer state with fewer snapshots",
        lambda tmp: _load_horizon(_horizon(8).state_dict(), 8, keep=1),
        ValueError,
        ("state_dict: received '1 parameter snapshots'", "another model"),
    ),
]


def _idx_bytes(shape) -> bytes:
    import struct

    return (
        bytes([0, 0, 0x08, len(shape)])
        + struct.pack(f">{len(shape)}I", *shape)
        + bytes(int(np.prod(shape)))
    )


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name.replace(" ", "_"), marks=c.marks) for c in LIB_CASES]
)
def test_library_case(case: LibCase, tmp_path):
    call = case.call(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(case.exc) as err:
        call()
    first = str(err.value).splitlines()[0] if str(err.value) else ""
    RESULTS["lib: " + case.name] = {
        "one_line": "\n" not in str(err.value).strip(),
        "lost": [r for r, b in before.items() if _snapshot(tmp_path).get(r) != b],
    }
    for words in case.words:
        assert words in first, first
    assert _snapshot(tmp_path) == before  # reading never changes the file


def test_every_fault_of_the_issue_is_catalogued():
    covered = {c.why for c in CASES} | {c.why for c in LIB_CASES}
    assert WHY - covered == set()
    names = [c.name for c in CASES] + [c.name for c in LIB_CASES]
    assert len(names) == len(set(names)), "case names are ids: each once"


def _counts() -> dict:
    cli = [RESULTS[c.name] for c in CASES if c.name in RESULTS]
    lib = [RESULTS["lib: " + c.name] for c in LIB_CASES if "lib: " + c.name in RESULTS]
    both = cli + lib
    return {
        "cases": len(CASES) + len(LIB_CASES),
        "cli cases": len(CASES),
        "library cases": len(LIB_CASES),
        "ran": len(both),
        "one line": sum(r["one_line"] for r in both),
        "lost data": sum(bool(r["lost"]) for r in both),
        "left an empty --out folder": sum(
            bool(r.get("created")) and c.leaves_empty in r["created"]
            for c in CASES
            if c.name in RESULTS and c.leaves_empty
            for r in [RESULTS[c.name]]
        ),
    }


def test_catalogue_counts():
    """Last in the file: the counts over the cases that ran above (all of them in a full
    run of this file)."""
    counts = _counts()
    print("\nfault catalogue:", ", ".join(f"{k} {v}" for k, v in counts.items()))
    if counts["ran"] < counts["cases"]:
        pytest.skip(f"only {counts['ran']} of {counts['cases']} cases ran (a selection)")
    expected_fail = sum(any(m.name == "xfail" for m in c.marks) for c in [*CASES, *LIB_CASES])
    assert counts["cases"] >= 113  # the issue's walk through tried 113
    assert counts["lost data"] == 0
    assert counts["one line"] >= counts["cases"] - expected_fail


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider"]))
