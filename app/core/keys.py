"""A hash computed once for the frozen dataclasses that key the core's caches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from operator import attrgetter
from typing import Any, TypeVar

T = TypeVar("T")

# Per class: its fields' values as one tuple (attrgetter of every field name, built once per class).
_VALUES: dict[type, Callable[[Any], tuple[Any, ...]]] = {}


def field_values(self: Any) -> tuple[Any, ...]:
    """The dataclass's field values in field order (what its generated __eq__ and hash compare)."""
    get = _VALUES.get(type(self))
    if get is None:
        names = [f.name for f in fields(self)]
        # attrgetter of a single name returns the bare value: keep the tuple
        get = attrgetter(*names) if len(names) > 1 else (lambda obj: (getattr(obj, names[0]),))
        _VALUES[type(self)] = get
    return get(self)


def cached_hash(self: Any) -> int:
    """The dataclass's own hash (of its fields' tuple), kept on the instance after the first call.

    An estimate looks up a dozen lru_caches keyed by the architecture (30 fields and a tuple of
    linears) and the setup: hashing them anew each time was a third of a warm estimate.
    """
    found: int | None = self.__dict__.get("_hash")
    if found is None:
        found = hash(field_values(self))
        object.__setattr__(self, "_hash", found)
    return found


def state_without_hash(self: Any) -> dict[str, Any]:
    """Pickle state without the kept hash (string hashes differ between processes)."""
    return {k: v for k, v in self.__dict__.items() if k != "_hash"}


class HashOnceTuple(tuple[T, ...]):
    """A tuple that keys caches on every estimate: its hash is computed once, then kept."""

    _hash: int

    def __hash__(self) -> int:
        try:
            return self._hash
        except AttributeError:
            self._hash = tuple.__hash__(self)
            return self._hash
