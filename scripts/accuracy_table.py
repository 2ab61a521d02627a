"""Print the markdown accuracy table: every ok calibration run, measured vs predicted peak (NVML used).

.venv/bin/python scripts/accuracy_table.py [data/calibration/h200-*.jsonl ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.calibration import compare, load_runs, markdown_table


def main(args: list[str]) -> None:
    """Print the table for the given JSONL files (all of data/calibration by default)."""
    runs = load_runs([Path(a) for a in args] if args else None)
    print(markdown_table([compare(r) for r in runs]))


if __name__ == "__main__":
    main(sys.argv[1:])
