"""Optimizers named by class path (``torch.optim.AdamW``, ``pytorch_optimizer.SOAP``).

A config table ``kind = "torch.optim.AdamW"`` with ``args = {weight_decay = 0.01}`` builds
``torch.optim.AdamW(params, lr=lr, weight_decay=0.01)``. The class is imported and its
keyword arguments are checked against its signature when the config is read, so an unknown
path, a missing package or a misspelt keyword is one line naming the key.
"""

from __future__ import annotations

import importlib
import inspect

import torch

#: Short names for the class paths users reach for most.
ALIASES = {
    "adamw": "torch.optim.AdamW",
    "soap": "pytorch_optimizer.SOAP",
    "shampoo": "pytorch_optimizer.Shampoo",
}

#: Packages that provide optimizers beyond torch.optim, with the pip extra that installs them.
EXTRAS = {"pytorch_optimizer": "pip install 'node_ocp[baselines]' (pytorch-optimizer)"}


class ClassPathError(ValueError):
    """A class path that cannot be imported or is not an optimizer, or a bad keyword.

    ``key`` names the config key at fault: ``kind``, ``args`` or ``args.NAME``.
    """

    def __init__(self, message: str, key: str = "kind", missing: bool = False):
        super().__init__(message)
        self.key = key
        self.missing = missing  # the class's package is not installed


def is_class_path(kind: str) -> bool:
    """Whether ``kind`` names a class (a dotted path or an alias), not a built-in kind."""
    return kind in ALIASES or "." in kind


def resolve(kind: str) -> type:
    """The ``torch.optim.Optimizer`` subclass ``kind`` names (an alias or ``module.Class``)."""
    path = ALIASES.get(kind, kind)
    module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise ClassPathError(f"received {kind!r}; accepted: 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        top = module_name.split(".")[0]
        hint = f" ({EXTRAS[top]})" if top in EXTRAS else ""
        raise ClassPathError(
            f"received {kind!r}, but module {module_name!r} cannot be imported ({exc}){hint}; "
            "accepted: a class path of an installed package, e.g. 'torch.optim.AdamW'",
            missing=True,
        ) from None
    cls = getattr(module, name, None)
    if cls is None:
        raise ClassPathError(
            f"received {kind!r}, but {module_name!r} has no attribute {name!r}; accepted: "
            "a class path of an installed package, e.g. 'torch.optim.AdamW'"
        )
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ClassPathError(
            f"received {kind!r}, which is not a torch.optim.Optimizer subclass; accepted: an "
            "optimizer class such as 'torch.optim.AdamW'"
        )
    return cls


def keyword_names(cls: type) -> list[str]:
    """The named keyword arguments of ``cls.__init__`` after ``params`` (``**kwargs`` is
    not a name: a keyword it would swallow silently is refused)."""
    sig = inspect.signature(cls.__init__)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in sig.parameters.values() if p.kind in kinds]
    return [n for n in names if n not in ("self", "params")]


def convert(value):
    """TOML arrays to tuples (``betas = [0.9, 0.99]`` -> ``(0.9, 0.99)``)."""
    if isinstance(value, list):
        return tuple(convert(v) for v in value)
    return value


def build(kind: str, params, lr: float | None, args: dict) -> torch.optim.Optimizer:
    """``cls(params, lr=lr, **args)``; ``lr=None`` keeps the class's own default.

    Raises :class:`ClassPathError` naming the keyword that is unknown or the value the class
    refused.
    """
    cls = resolve(kind)
    names = keyword_names(cls)
    for key in args:
        if key not in names:
            raise ClassPathError(
                f"not a keyword of {cls.__module__}.{cls.__name__}; accepted: "
                f"{', '.join(n for n in names if n != 'lr')}",
                key=f"args.{key}",
            )
    if "lr" in args:
        raise ClassPathError("accepted: the learning rate in the table's lr key", "args.lr")
    kwargs = {k: convert(v) for k, v in args.items()}
    if lr is not None:
        kwargs["lr"] = lr
    try:
        return cls(params, **kwargs)
    except (ValueError, TypeError) as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise ClassPathError(f"{cls.__name__}({shown}) refused: {reason}", "args") from None


def default_lr(kind: str) -> float | None:
    """The class's own ``lr`` default (None when it has none)."""
    param = inspect.signature(resolve(kind).__init__).parameters.get("lr")
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return float(param.default)
