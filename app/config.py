"""Settings from the environment (prefix TUNEFIT_), cached."""

import json
from functools import lru_cache
from typing import Annotated, Any

from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Runtime configuration; every field is settable as TUNEFIT_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="TUNEFIT_", env_file=None, extra="ignore")

    database_url: str = "sqlite:///./tunefit.sqlite3"
    admin_token: str | None = None
    # Comma-separated (`https://a,https://b`) or a JSON list; NoDecode lets the validator see the raw text.
    cors_origins: Annotated[list[str], NoDecode] = []
    max_body_bytes: int = 256 * 1024
    log_level: str = "INFO"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        """Accept a JSON list or comma-separated origins."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value


@lru_cache
def get_settings() -> Settings:
    """Return the process-wide settings (tests override via dependency_overrides or cache_clear)."""
    return Settings()
