"""A hash computed once for the frozen dataclasses that key the core's caches."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def cached_hash(self: Any) -> int:
    """The dataclass's own hash (of its fields' tuple), kept on the instance after the first call.

    An estimate looks up a dozen lru_caches keyed by the architecture (30 fields and a tuple of
    linears) and the setup: hashing them anew each time was a third of a warm estimate.
    """
    found: int | None = self.__dict__.get("_hash")
    if found is None:
        found = hash(tuple(getattr(self, f.name) for f in fields(self)))
        object.__setattr__(self, "_hash", found)
    return found


def state_without_hash(self: Any) -> dict[str, Any]:
    """Pickle state without the kept hash (string hashes differ between processes)."""
    return {k: v for k, v in self.__dict__.items() if k != "_hash"}
