"""Service view for the models page: the API's model catalog plus each model's architecture numbers."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sqlalchemy.orm import Session

from app import catalog_cache, services
from app.core.architecture import parse_config
from app.core.errors import CoreInputError

# The numbers a reader compares models by; the rest of Architecture is the core's business.
ARCH_FIELDS = (
    "model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
    "vocab_size", "max_position_embeddings", "tie_embeddings", "num_experts", "experts_per_token",
    "sliding_window", "params_total", "params_active_per_token",
)


def models_with_architecture(session: Session) -> dict[str, Any]:
    """services.models_view, each model with `architecture` as the core parses its config.json."""
    view = services.models_view(session)
    snap = catalog_cache.snapshot(session)
    for model in view["models"]:
        found = snap.model(model["slug"])
        model["architecture"] = None
        if found is None:
            continue
        try:
            arch = asdict(parse_config(found.config))
        except CoreInputError:
            continue  # a config the core cannot read shows its catalog facts only
        model["architecture"] = {k: arch[k] for k in ARCH_FIELDS}
    return view
