"""Small configs for the training, CLI and experiment tests."""

import json
from pathlib import Path


def tiny(kind="density", **over) -> dict:
    """A small, fast config as nested dicts."""
    cfg = {
        "task": {
            "kind": "density",
            "dataset": "8gaussians",
            "n_train": 256,
            "n_val": 64,
            "n_test": 64,
        },
        "model": {"kind": "cnf", "hidden": [8]},
        "solver": {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3},
        "train": {
            "optimizer": "ocnopt",
            "steps": 12,
            "batch_size": 64,
            "eval_every": 3,
            "checkpoint_every": 4,
        },
        "optimizers": {
            "adam": {"kind": "adam", "lr": 0.05},
            "ocnopt": {"kind": "ocnopt", "lr": 0.05, "update_every": 3, "sample_dt": 0.1},
        },
    }
    if kind == "horizon":
        cfg["task"] = {
            "kind": "classification",
            "dataset": "spirals",
            "n_train": 256,
            "n_val": 64,
            "n_test": 64,
        }
        cfg["model"] = {"kind": "ode_mlp", "hidden": [8], "width": 2}
        cfg["horizon"] = {"mode": "feedback", "lr": 0.3, "penalty": 0.01, "warmup": 2}
    for path, value in over.items():
        table, key = path.split(".")
        cfg.setdefault(table, {})[key] = value
    return cfg


def write_toml(path: Path, cfg: dict) -> Path:
    """Write nested dicts of scalars/lists as TOML (enough for these configs)."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):  # an inline table
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        return repr(v)

    lines = []
    for table, body in cfg.items():
        if table == "optimizers":
            for name, opt in body.items():
                lines.append(f"[optimizers.{name}]")
                lines += [f"{k} = {val(v)}" for k, v in opt.items()]
        else:
            lines.append(f"[{table}]")
            lines += [f"{k} = {val(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
