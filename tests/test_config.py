"""Settings come from TUNEFIT_ variables; list settings accept the forms operators write."""

import pytest

from app.config import Settings


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://a.example,https://b.example", ["https://a.example", "https://b.example"]),
        (" https://a.example , ", ["https://a.example"]),
        ('["https://a.example"]', ["https://a.example"]),
        ("", []),
    ],
)
def test_cors_origins_from_env(monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]) -> None:
    monkeypatch.setenv("TUNEFIT_CORS_ORIGINS", raw)
    assert Settings().cors_origins == expected


def test_database_url_and_admin_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFIT_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("TUNEFIT_ADMIN_TOKEN", "s3cret")
    s = Settings()
    assert (s.database_url, s.admin_token) == ("postgresql+psycopg://u@h/db", "s3cret")
    monkeypatch.delenv("TUNEFIT_ADMIN_TOKEN")
    assert Settings().admin_token is None
