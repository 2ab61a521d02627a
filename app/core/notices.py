"""Warnings the core attaches to an estimate (the API's `warnings` items)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Notice:
    """A warning with a stable machine-readable code and a sentence for people."""

    code: str
    message: str
