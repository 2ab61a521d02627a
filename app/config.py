"""Settings from the environment (prefix TUNEFIT_), cached."""

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Runtime configuration; every field is settable as TUNEFIT_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="TUNEFIT_", env_file=None, extra="ignore")

    database_url: str = "sqlite:///./tunefit.sqlite3"
    admin_token: str | None = None
    cors_origins: list[str] = []
    max_body_bytes: int = 256 * 1024
    log_level: str = "INFO"


@lru_cache
def get_settings() -> Settings:
    """Return the process-wide settings (tests override via dependency_overrides or cache_clear)."""
    return Settings()
