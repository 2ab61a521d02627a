"""`python -m app.measure ...`: the same as `tunefit measure ...` (works with only the measure extra)."""

from app.measure.cli import main

raise SystemExit(main(prog="python3 -m app.measure"))
