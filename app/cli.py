"""`tunefit serve | estimate | measure | catalog ...`: the command line (same service calls as the API)."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

from app.config import Settings, get_settings

_CONFIG_FLAG_HELP = "a Hugging Face config.json: a file path, JSON text, or - for stdin"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tunefit` console script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # The harness parses its own arguments (it may run with only the measure extra installed).
    if args_list[:1] == ["measure"]:
        return _measure(args_list[1:])
    parser = _build_parser()
    args = parser.parse_args(args_list)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    result = handler(args)
    return int(result or 0)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunefit", description="Will my LLM fine-tune fit, how long will it take, what will it cost?"
    )
    sub = parser.add_subparsers(dest="command", metavar="{serve,estimate,measure,catalog}")

    serve = sub.add_parser("serve", help="migrate the database, load the seed catalog if empty, serve HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(handler=_serve)

    estimate = sub.add_parser("estimate", help="estimate memory, time and cost (the API's fields as flags)")
    _add_estimate_flags(estimate)
    estimate.add_argument("--json", action="store_true", help="print the API's JSON response")
    estimate.set_defaults(handler=_estimate)

    sub.add_parser("measure", help="run real training steps on a GPU (see `tunefit measure --help`)")
    _add_catalog(sub)
    return parser


def _add_catalog(sub: Any) -> None:
    """`tunefit catalog ...` from app.catalog_cli, when that part is installed."""
    try:
        from app import catalog_cli
    except ImportError as exc:
        reason = exc
        missing = sub.add_parser("catalog", help="catalog commands (unavailable)")
        missing.set_defaults(handler=lambda _args: _unavailable("catalog", reason))
        return
    catalog = sub.add_parser("catalog", help="list, import and export the catalog")
    catalog_cli.add_subcommands(catalog)


def _unavailable(what: str, exc: BaseException) -> int:
    print(f"tunefit {what} is unavailable here: {exc}", file=sys.stderr)
    return 2


def _measure(argv: list[str]) -> int:
    try:
        from app.measure.cli import main as measure_main
    except ImportError as exc:
        return _unavailable("measure", exc)
    return int(measure_main(argv) or 0)


def ensure_database(settings: Settings) -> None:
    """Migrate to head and load the seed catalog if it is empty, under one database-wide lock."""
    from app.migrate import prepare_database

    # One lock for both steps: replicas starting together would otherwise all see an empty catalog
    # and all seed it (a unique violation for the losers).
    prepare_database(settings.database_url)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.logs import uvicorn_log_config

    settings = get_settings()
    ensure_database(settings)
    # access_log off: the app logs one structured JSON line per request itself.
    uvicorn.run(
        "app.main:app", host=args.host, port=args.port, access_log=False, proxy_headers=True,
        log_config=uvicorn_log_config(settings.log_level),
    )
    return 0


# --- estimate ---------------------------------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_estimate_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EstimateRequest field, kebab-cased; booleans get --x / --no-x."""
    from app.schemas import EstimateRequest

    for name, info in EstimateRequest.model_fields.items():
        api_name = info.alias or name
        flag = _flag(api_name)
        help_text = (info.description or "").replace("%", "%%")
        if api_name == "model_config":
            parser.add_argument(flag, dest=api_name, default=argparse.SUPPRESS, help=_CONFIG_FLAG_HELP)
            continue
        choices = _literal_choices(info.annotation)
        if _is_bool(info.annotation):
            parser.add_argument(
                flag, dest=api_name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag, dest=api_name, default=argparse.SUPPRESS, choices=choices,
                help=f"{help_text} (default: {_default_text(info)})".strip(),
            )


def _literal_choices(annotation: Any) -> list[str] | None:
    for arg in (annotation, *get_args(annotation)):
        if get_origin(arg) is typing.Literal:
            return [str(v) for v in get_args(arg)]
    return None


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _default_text(info: Any) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        return ",".join(value) if isinstance(value, list) else str(value)
    return "none" if info.default is None else str(info.default)


def _read_config(text: str) -> Any:
    """--model-config: a path, JSON text, or - for stdin."""
    if text == "-":
        return json.load(sys.stdin)
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return json.loads(stripped)
    return json.loads(Path(text).read_text(encoding="utf-8"))


def _estimate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from app import services
    from app.errors import AppError, InputError
    from app.schemas import EstimateRequest

    data: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "json")}
    try:
        if "model_config" in data:
            data["model_config"] = _read_config(data["model_config"])
        request = EstimateRequest.model_validate(data)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            for err in exc.errors():
                field = str(err["loc"][0]) if err["loc"] else "request"
                print(f"tunefit estimate: {_flag(field)}: {err['msg']}", file=sys.stderr)
        else:
            print(f"tunefit estimate: --model-config: {exc}", file=sys.stderr)
        return 2

    settings = get_settings()
    ensure_database(settings)
    try:
        result = services.run_estimate_for_settings(settings, request)
    except InputError as exc:
        print(f"tunefit estimate: {_flag(exc.field)}: {exc.detail}", file=sys.stderr)
        return 2
    except AppError as exc:
        body = exc.body()
        hint = ", ".join(body.get("suggestions", []))
        suffix = f" (did you mean: {hint})" if hint else ""
        print(f"tunefit estimate: {exc.detail}{suffix}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(services.summary_text(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
