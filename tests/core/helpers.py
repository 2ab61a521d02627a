"""Shared helpers for the core tests: model configs from data/models/."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from app.core.architecture import Architecture, parse_config

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "data" / "models"


@cache
def config(slug: str) -> dict[str, Any]:
    """The config.json of a catalog model, as a dict."""
    return json.loads((MODELS / f"{slug}.json").read_text())


@cache
def arch(slug: str) -> Architecture:
    """The parsed architecture of a catalog model."""
    return parse_config(config(slug))
