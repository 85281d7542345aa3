"""Prove that a refactor changes no behaviour: the same seeded runs log the same metrics.

``record`` trains a fixed matrix of short seeded runs through the CLI (every model kind,
OCNOpt's curvature variants, factor sources, step modes and feedback modes, the baselines,
a horizon control, user files), each with curvature refreshes, step adaptations,
evaluations and checkpoints within its few steps, plus a run stopped half-way for the
resume check. ``check`` compares two records' ``metrics.jsonl`` and ``summary.json`` value
for value (floats exactly; wall-clock, memory and path keys ignored) and resumes BEFORE's
half-way run with the code imported now, which must log what BEFORE's full run logged.

    python experiments/same_metrics.py record /tmp/before [--only NAME ...] [--jobs 2]
    python experiments/same_metrics.py check /tmp/before /tmp/after   # exit 0: identical

The runs import ``node_ocp`` as the environment does (``PYTHONPATH=<a clean worktree>``
wins over the editable install; the working directory is never put on ``sys.path``); the
manifest names the file imported, its commit and whether its ``node_ocp/`` was clean.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
FAST = {"train": {"eval_every": 5, "checkpoint_every": 5}}


def ocn(section: str = "ocnopt", **keys) -> dict:
    """FAST plus a curvature refresh every 5 steps (and ``keys``) in ``[optimizers.section]``."""
    return {**FAST, f"optimizers.{section}": {"update_every": 5, **keys}}


# feedback across stages (a CNF has one stage: it would run open-loop); "dense" builds
# exact Jacobians (a tiny field, rk4) and needs a fixed step; relative damping leaves its
# Riccati matrices singular here (LinAlgError), absolute damping does not
DENSE = {
    **ocn(feedback="dense", step="fixed", lr=0.01, damping_mode="absolute"),
    "model": {"hidden": [8]},
    "solver": {"method": "rk4"},
}
QUICK_OCNOPT = (
    "ocnopt ocnopt-kfac ocnopt-diagonal ocnopt-identity ocnopt-dense ocnopt-sampled "
    "ocnopt-exact ekfac-standard"
).split()
# (name, config, optimizer section, steps, overrides)
CASES = [
    *[(f"quick-{o}", "quickstart.toml", o, 12, ocn(o)) for o in QUICK_OCNOPT],
    ("quick-adam", "quickstart.toml", "adam", 12, FAST),
    ("quick-adam-torchdiffeq", "quickstart.toml", "adam-torchdiffeq", 12, FAST),
    ("quick-ocnopt-fixed", "quickstart.toml", "ocnopt", 12, ocn(step="fixed", lr=0.05)),
    # a schedule attached after the optimizer is built (the training loop does so)
    ("quick-ocnopt-cosine", "quickstart.toml", "ocnopt", 12, ocn(schedule="cosine", warmup=2)),
    ("digits-ocnopt", "digits_classification.toml", "ocnopt", 10, ocn()),
    ("digits-adam", "digits_classification.toml", "adam", 10, FAST),
    ("vowels-odernn-ocnopt", "ts_japanese_vowels.toml", "ocnopt", 10, ocn()),
    ("spiral-forecast-ocnopt", "forecast_spiral.toml", "ocnopt", 10, ocn()),
    ("motions-cde-ocnopt", "ts_basic_motions.toml", "ocnopt", 10, ocn()),
    ("horizon-spirals-ocnopt", "horizon_spirals.toml", "ocnopt", 20, ocn()),
    ("iris-cnf-ocnopt", "cnf_iris.toml", "ocnopt", 12, ocn()),
    ("digits-image-cnf-ocnopt", "cnf_digits_image_multiscale.toml", "ocnopt", 10, ocn()),
    ("own-table-ocnopt", "own_table.toml", "ocnopt", 12, ocn()),
    ("own-series-ocnopt", "own_series.toml", "ocnopt", 10, ocn()),
    ("own-table-feedback-gn", "own_table.toml", "ocnopt", 12, ocn(feedback="gauss_newton")),
    ("own-table-feedback-dense", "own_table.toml", "ocnopt", 10, DENSE),
]
# the resume check: one config, a full run and the same run stopped where it checkpoints;
# a refresh every 4 steps puts the resume point (10) inside a curvature period
RESUME_OVERRIDES = {**ocn(update_every=4), "train": {"eval_every": 5, "checkpoint_every": 10}}
RESUME = ("quickstart.toml", "ocnopt", 20, RESUME_OVERRIDES)
RESUME_RUNS = (("resume_full", 20), ("resume_half", 10))


# ---------------------------------------------------------------- a small TOML writer
def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)  # repr: 0.0001, 1e-05, inf, -inf
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are TOML's
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {type(v).__name__}: {v!r}")


def dumps_toml(data: dict) -> str:
    """TOML text of nested dicts: top-level dicts and dicts of dicts as [tables], other dicts
    inline; what tomllib reads back equals ``data``."""
    lines: list[str] = []

    def table(d: dict, prefix: list[str], top: bool) -> None:
        subs = {k: v for k, v in d.items() if isinstance(v, dict) and (top or _all_dicts(v))}
        plain = [(k, v) for k, v in d.items() if k not in subs]
        if prefix and (plain or not subs):
            lines.extend(["", "[" + ".".join(map(_key, prefix)) + "]"])
        lines.extend(f"{_key(k)} = {_value(v)}" for k, v in plain)
        for k, v in subs.items():
            table(v, [*prefix, k], False)

    table(data, [], True)
    return "\n".join(lines).lstrip("\n") + "\n"


def _all_dicts(d: dict) -> bool:
    return bool(d) and all(isinstance(v, dict) for v in d.values())


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """``raw`` with ``{"a.b": {key: value}}`` merged into its table ``[a.b]`` (made if absent)."""
    out = json.loads(json.dumps(raw))  # a deep copy (TOML values are JSON values, bar dates)
    for dotted, keys in overrides.items():
        node = out
        for part in dotted.split("."):
            node = node.setdefault(part, {})
        node.update(keys)
    return out


def derive_config(src: Path, overrides: dict, dest: Path) -> Path:
    """Write ``src`` with ``overrides`` to ``dest``; relative data paths made absolute."""
    raw = apply_overrides(tomllib.loads(src.read_text()), overrides)
    for key in ("path", "labels_path"):
        p = raw.get("task", {}).get(key)
        if p and not Path(p).expanduser().is_absolute():
            raw["task"][key] = str((src.parent / p).resolve())
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(dumps_toml(raw))
    return dest


# ---------------------------------------------------------------- running the CLI
def python_cmd() -> list[str]:
    # -P: the working directory does not shadow PYTHONPATH or the installed package
    return [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else [])]


def run_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_cmd(config: Path, optimizer: str, steps: int, out: Path, *extra: str) -> list[str]:
    args = f"--optimizer {optimizer} --seed 0 --max-steps {steps} --no-progress".split()
    return [*python_cmd(), "-m", "node_ocp", "train", str(config), *args, "--out", str(out), *extra]


def run(cmd: list[str], cwd: Path) -> dict:
    start = time.perf_counter()
    p = subprocess.run(
        cmd, cwd=cwd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return {
        "command": cmd,
        "returncode": p.returncode,
        "seconds": time.perf_counter() - start,
        "status": "ok" if p.returncode == 0 else "failed",
        "output_tail": p.stdout[-2000:],
    }


def code_info(cwd: Path) -> dict:
    """Which node_ocp the runs import, its commit and whether its node_ocp/ is clean."""
    probe = "import node_ocp, torch; print(node_ocp.__file__); print(torch.__version__)"
    cmd = [*python_cmd(), "-c", probe]
    out = subprocess.run(cmd, cwd=cwd, env=run_env(), capture_output=True, text=True, check=True)
    out = out.stdout.split()
    repo = Path(out[0]).resolve().parents[1]

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout

    return {
        "node_ocp": out[0],
        "torch": out[1],
        "python": sys.version.split()[0],
        "commit": git("rev-parse", "HEAD").strip(),
        "node_ocp_clean": git("status", "--porcelain", "--", "node_ocp") == "",
    }


def record(out: Path, only: list[str] | None, jobs: int, configs: Path) -> int:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    todo = [(n, c, o, st, ov, n) for n, c, o, st, ov in CASES if not only or n in only]
    if not only or "resume" in only:
        todo += [(n, *RESUME[:2], st, RESUME[3], "resume") for n, st in RESUME_RUNS]
    jobs_list = []  # (name, spec, command)
    for name, cfg, opt, steps, over, derived in todo:
        path = derive_config(configs / cfg, over, out / "configs" / f"{derived}.toml")
        spec = {"config": str(configs / cfg), "optimizer": opt, "steps": steps, "overrides": over}
        jobs_list.append((name, spec, train_cmd(path, opt, steps, out / name, "--overwrite")))
    info = code_info(out)
    print(
        f"node_ocp from {info['node_ocp']} (commit {info['commit'][:10]}, "
        f"node_ocp/ {'clean' if info['node_ocp_clean'] else 'MODIFIED'}); {len(jobs_list)} runs"
    )
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda j: run(j[2], out), jobs_list))
    total = time.perf_counter() - start
    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if only and manifest_path.exists() else {}
    cases = old.get("cases", {})
    for (name, spec, _), res in zip(jobs_list, results):
        cases[name] = {**spec, **res}
    manifest = {**info, "jobs": jobs, "record_seconds": total, "cases": cases}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    for (name, _, _), res in zip(jobs_list, results):
        print(f"{name:28s} {res['status']:7s} {res['seconds']:6.1f}s")
        if res["status"] != "ok":
            print("    " + res["output_tail"][-600:].replace("\n", "\n    "))
    failed = sum(r["status"] != "ok" for r in results)
    print(
        f"{len(results) - failed}/{len(results)} ok in {total:.1f}s (jobs={jobs}); {manifest_path}"
    )
    return 1 if failed else 0


# ---------------------------------------------------------------- comparing
#: compared although their names say "time": the horizon, and a budget's stop (a bool)
KEPT = {"t1", "stopped_by_time"}


def is_ignored(key: str) -> bool:
    """Wall-clock (``seconds``, ``*time*``, ``*_s``), memory (``*_mb``) and path keys."""
    k = key.lower()
    if k in KEPT:
        return False
    return any(w in k for w in ("second", "time", "path", "source")) or k.endswith(("_s", "_mb"))


def same(a, b) -> bool:
    """Exact equality of parsed JSON (NaN equals NaN; int and float differ), ignored keys
    left out of dicts."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        ka = [k for k in a if not is_ignored(k)]
        kb = [k for k in b if not is_ignored(k)]
        return sorted(ka) == sorted(kb) and all(same(a[k], b[k]) for k in ka)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def first_difference(a: dict, b: dict) -> tuple[str, object, object] | None:
    for k in [*a, *(k for k in b if k not in a)]:
        if not is_ignored(k) and not same(a.get(k, "<missing>"), b.get(k, "<missing>")):
            return k, a.get(k, "<missing>"), b.get(k, "<missing>")
    return None


def compare_records(before: list[dict], after: list[dict]) -> str | None:
    """None if the metrics logs agree on every kept value, else where they first differ."""
    for i in range(max(len(before), len(after))):
        if i >= len(before) or i >= len(after):
            side, rec = ("BEFORE", after[i]) if i >= len(before) else ("AFTER", before[i])
            return f"line {i + 1} (step {rec.get('step')}) missing in {side}"
        d = first_difference(before[i], after[i])
        if d is not None:
            return f"step {before[i].get('step')}: {d[0]} = {d[1]!r} before, {d[2]!r} after"
    return None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare_run(before: Path, after: Path) -> str:
    for f in ("metrics.jsonl", "summary.json"):
        if not (before / f).is_file() or not (after / f).is_file():
            return f"missing ({f} in {'BEFORE' if not (before / f).is_file() else 'AFTER'})"
    d = compare_records(read_jsonl(before / "metrics.jsonl"), read_jsonl(after / "metrics.jsonl"))
    if d is not None:
        return f"differs: metrics.jsonl {d}"
    d = first_difference(*(json.loads((p / "summary.json").read_text()) for p in (before, after)))
    return "identical" if d is None else f"differs: summary.json {d[0]} = {d[1]!r} / {d[2]!r}"


def check(before: Path, after: Path) -> int:
    names = sorted(
        {p.parent.name for d in (before, after) for p in d.glob("*/metrics.jsonl")}
        | {
            n
            for d in (before, after)
            if (d / "manifest.json").is_file()
            for n in json.loads((d / "manifest.json").read_text())["cases"]
        }
    )
    results = {n: compare_run(before / n, after / n) for n in names}
    with tempfile.TemporaryDirectory(prefix="same_metrics_") as tmp:
        half = Path(tmp) / "resume_half"
        if (before / "resume_half").is_dir() and (before / "resume_full").is_dir():
            shutil.copytree(before / "resume_half", half)
            info = code_info(Path(tmp))
            print(f"resume with node_ocp from {info['node_ocp']} (commit {info['commit'][:10]})")
            cmd = train_cmd(
                before / "configs" / "resume.toml", RESUME[1], RESUME[2], half, "--resume"
            )
            res = run(cmd, Path(tmp))
            results["resume (BEFORE half + now)"] = (
                f"failed: {res['output_tail'][-400:]}"
                if res["returncode"]
                else compare_run(before / "resume_full", half)
            )
        else:
            results["resume (BEFORE half + now)"] = "missing (resume_full/resume_half in BEFORE)"
    for n, r in results.items():
        print(f"{n:28s} {r}")
    bad = [n for n, r in results.items() if r != "identical"]
    print(
        f"{len(results) - len(bad)}/{len(results)} identical"
        + (f"; not: {', '.join(bad)}" if bad else "")
    )
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="run the matrix into OUT")
    r.add_argument("out", type=Path)
    r.add_argument("--only", nargs="+", metavar="NAME", help="these cases ('resume': its two)")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--configs", type=Path, default=ROOT / "configs", help="the configs folder")
    c = sub.add_parser("check", help="compare two records; resume BEFORE's half run")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    a = ap.parse_args(argv)
    if a.command == "record":
        known = {n for n, *_ in CASES} | {"resume"}
        if a.only and set(a.only) - known:
            ap.error(f"--only: unknown {sorted(set(a.only) - known)}; known: {sorted(known)}")
        return record(a.out, a.only, a.jobs, a.configs.resolve())
    return check(a.before.resolve(), a.after.resolve())


if __name__ == "__main__":
    sys.exit(main())
