"""Named kinds of one sort — task kinds, model kinds — in registration order.

A kind is a class with a ``name``; a config names it by that string and the registry turns
the string into the class once, at the boundary (``REGISTRY[name]``), so that no code
further in compares the string. An unknown name is one :class:`ConfigError` line naming
the key, what it received and what it accepts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from .config import ConfigError

K = TypeVar("K", bound=type)


class Registry(Generic[K]):
    """Kinds by name. ``key`` is the config key that names one (``[model].kind``)."""

    def __init__(self, key: str):
        self.key = key
        self._kinds: dict[str, K] = {}

    def register(self, kind: K) -> K:
        """Add ``kind`` under ``kind.name`` (usable as a class decorator); a name taken by
        another class is an error."""
        name = kind.name
        if not isinstance(name, str) or not name:
            raise TypeError(f"register: {kind!r} has no string `name`")
        held = self._kinds.get(name)
        if held is not None and held is not kind:
            raise ValueError(f"{self.key}: {name!r} is already registered as {held.__name__}")
        self._kinds[name] = kind
        return kind

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._kinds)

    def __getitem__(self, name: str) -> K:
        kind = self._kinds.get(name) if isinstance(name, str) else None
        if kind is None:
            raise ConfigError(
                f"{self.key}: received {name!r}; accepted: one of "
                f"{', '.join(map(repr, self._kinds))}"
            )
        return kind

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __iter__(self) -> Iterator[K]:
        return iter(self._kinds.values())
