"""Errors raised by the pure core when its inputs are impossible."""

from __future__ import annotations


class CoreInputError(ValueError):
    """An input the core cannot work with; `field` is the API field name to blame."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
