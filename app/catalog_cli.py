"""`tunefit catalog load | import-prices FILE | import-gpus FILE | list [WHAT] [--json]`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app import catalog
from app.catalog_rows import ImportReport
from app.config import get_settings


def add_subcommands(parent: Any) -> None:
    """Add the catalog commands under `parent`: the `catalog` parser, or the top-level subparsers."""
    if isinstance(parent, argparse.ArgumentParser):
        parser = parent
    else:  # an argparse subparsers action: make the `catalog` parser first
        parser = parent.add_parser("catalog", help="load, import and list the catalog")
    sub = parser.add_subparsers(dest="catalog_command", metavar="{load,import-prices,import-gpus,list}")
    parser.set_defaults(handler=lambda _a: _usage(parser))

    load = sub.add_parser("load", help="load the seed catalog (data/); idempotent, appends new prices")
    load.add_argument("--data-dir", type=Path, default=None, help="seed directory (default: data/)")
    load.set_defaults(handler=cmd_load)

    for name, what in (("import-prices", "prices"), ("import-gpus", "gpus")):
        help_text = f"import {what} from a CSV file (header as data/{what}.csv); all-or-nothing"
        imp = sub.add_parser(name, help=help_text)
        imp.add_argument("file", help="CSV file path, or - for stdin")
        imp.set_defaults(handler=cmd_import_prices if what == "prices" else cmd_import_gpus)

    lst = sub.add_parser("list", help="print the catalog")
    lst.add_argument("what", nargs="?", default="gpus", choices=("gpus", "models", "prices", "tiers"))
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(handler=cmd_list)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


@contextmanager
def _session() -> Iterator[Session]:
    """A committed-on-success session on the configured database, migrated to head first."""
    from app.db import engine_for, session_factory, session_scope
    from app.migrate import upgrade_to_head

    url = get_settings().database_url
    upgrade_to_head(url)
    yield from session_scope(session_factory(engine_for(url)))


def _print_report(title: str, report: ImportReport) -> None:
    print(f"{title}: {report.inserted} inserted, {report.updated} updated, {report.unchanged} unchanged")
    for issue in report.errors:
        print(f"  line {issue.line}: {issue.message}", file=sys.stderr)


def cmd_load(args: argparse.Namespace) -> int:
    """Load (or refresh) the seed catalog."""
    try:
        with _session() as session:
            reports = catalog.load_seed(session, args.data_dir)
    except catalog.SeedError as exc:
        for part, report in exc.reports.items():
            _print_report(part, report)
        print("nothing was loaded: fix the rows above", file=sys.stderr)
        return 1
    for part, report in reports.items():
        _print_report(part, report)
    return 0


def _read(path: str) -> str:
    return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")


def _import(args: argparse.Namespace, importer: Callable[[Session, str], ImportReport], what: str) -> int:
    try:
        text = _read(args.file)
    except OSError as exc:
        print(f"cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    with _session() as session:
        report = importer(session, text)
    _print_report(what, report)
    if not report.ok:
        print(f"nothing was imported: {len(report.errors)} bad row(s)", file=sys.stderr)
        return 1
    return 0


def cmd_import_prices(args: argparse.Namespace) -> int:
    """Append price observations from CSV."""
    return _import(args, catalog.import_prices_csv, "prices")


def cmd_import_gpus(args: argparse.Namespace) -> int:
    """Insert or update GPUs from CSV."""
    return _import(args, catalog.import_gpus_csv, "gpus")


def _rows(session: Session, what: str) -> list[dict[str, Any]]:
    if what == "gpus":
        return [
            {
                "slug": g.gpu.slug, "name": g.gpu.name, "vram_total_mib": g.gpu.vram_total_mib,
                "bf16_tflops": g.gpu.bf16_tflops, "fp16_tflops": g.gpu.fp16_tflops,
                "cheapest_usd_per_hour": g.latest_prices[0].usd_per_gpu_hour if g.latest_prices else None,
            }
            for g in catalog.list_gpus(session)
        ]
    if what == "models":
        return [
            {"slug": m.slug, "hf_id": m.hf_id, "params_total": m.params_total, "license": m.license}
            for m in catalog.list_models(session)
        ]
    if what == "prices":
        return [
            {
                "gpu": p.gpu.slug, "provider": p.provider, "kind": p.kind,
                "usd_per_gpu_hour": p.usd_per_gpu_hour, "observed_on": p.observed_on.isoformat(),
                "source": p.source,
            }
            for p in catalog.list_prices(session)
        ]
    return [
        {"slug": t.slug, "name": t.name, "kind": t.kind, "usd_min": t.usd_min, "usd_max": t.usd_max,
         "gpus": ",".join(t.gpu_slugs)}
        for t in catalog.list_tiers(session)
    ]


def cmd_list(args: argparse.Namespace) -> int:
    """Print one catalog table as aligned text or JSON."""
    with _session() as session:
        rows = _rows(session, args.what)
        updated = catalog.catalog_last_updated(session)
    if args.json:
        stamp = updated.isoformat() if updated else None
        print(json.dumps({"last_updated": stamp, args.what: rows}, indent=2))
        return 0
    if not rows:
        print(f"no {args.what} in the catalog (run `tunefit catalog load`)")
        return 0
    cols = list(rows[0])
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    print(f"({len(rows)} {args.what}; catalog updated {updated.isoformat() if updated else 'never'})")
    return 0
