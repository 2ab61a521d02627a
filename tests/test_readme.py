"""The README is true: its commands exist and its accuracy tables are the calibration set's current ones."""

from pathlib import Path

import pytest

from scripts.update_readme import BLOCKS, generated, readme_block

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "README.md").read_text()


def test_the_two_commands_are_the_quick_start() -> None:
    assert "make run" in TEXT and "make test" in TEXT
    makefile = (ROOT / "Makefile").read_text()
    assert "\nrun:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_accuracy_tables_match_the_calibration_set(name: str) -> None:
    assert readme_block(TEXT, name) == generated(name), "run scripts/update_readme.py"


def test_every_configuration_variable_is_a_setting() -> None:
    from app.config import Settings

    for field in Settings.model_fields:
        assert f"TUNEFIT_{field.upper()}" in TEXT, field
