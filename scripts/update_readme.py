"""Regenerate README.md's accuracy tables from the calibration set (the README test checks they match).

.venv/bin/python scripts/update_readme.py
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = {
    "memory-accuracy": ["scripts/accuracy_table.py"],
    "throughput-accuracy": ["scripts/fit_throughput.py"],
}


def generated(name: str) -> str:
    """The current output of the script behind block `name`."""
    out = subprocess.run(
        [sys.executable, *BLOCKS[name]], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return out.strip()


def block_pattern(name: str) -> re.Pattern[str]:
    """The README region between the block's start and end markers."""
    return re.compile(rf"(<!-- {name}:start -->\n)(.*?)(<!-- {name}:end -->)", re.S)


def readme_block(text: str, name: str) -> str:
    """The text currently between the block's markers."""
    match = block_pattern(name).search(text)
    if match is None:
        raise SystemExit(f"README.md has no {name} markers")
    return match.group(2).strip()


def main() -> None:
    """Rewrite every generated block in README.md."""
    text = README.read_text()
    for name in BLOCKS:
        body = generated(name)

        def replace(m: re.Match[str], body: str = body) -> str:
            return f"{m.group(1)}{body}\n{m.group(3)}"

        text = block_pattern(name).sub(replace, text)
    README.write_text(text)


if __name__ == "__main__":
    main()
