"""Static checks of the Dockerfile, .dockerignore and docker-compose.yml (Docker cannot run here)."""

from __future__ import annotations

import re
import shlex
import tomllib
from typing import Any

import pytest
import yaml
from deploy_dockerfile import (
    REPO,
    Instruction,
    copies,
    dockerignore_patterns,
    env_vars,
    final_stage,
    healthcheck_command,
    ignored,
    parse,
)
from sqlalchemy.engine import make_url

from app.config import Settings

# What the image may be configured by: the app's own settings, the bind address, and Python/pip knobs.
SLIM_PYTHON = re.compile(r"python:(\d+)\.(\d+)(?:\.\d+)?-slim(?:-[a-z]+)?(?:@sha256:[0-9a-f]{64})?")
ALLOWED_ENV = re.compile(r"^(TUNEFIT_[A-Z0-9_]+|HOST|PORT|PYTHON[A-Z0-9_]*|PIP_[A-Z0-9_]+)$")


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    """The Dockerfile, parsed."""
    return parse((REPO / "Dockerfile").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml, loaded."""
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _only(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [ins for ins in instructions if ins.keyword == keyword]


def _setting_names() -> set[str]:
    return {f"TUNEFIT_{name.upper()}" for name in Settings.model_fields}


def test_parser_reads_continuations_and_forms() -> None:
    """The reader itself: continuations, comments inside them, ENV forms, exec-form COPY."""
    text = 'FROM python:3.11-slim\nENV A=1 \\\n  # note\n  B="two words"\nENV C 3\nCOPY ["a b", "c/"]\n'
    parsed = parse(text)
    assert [i.keyword for i in parsed] == ["FROM", "ENV", "ENV", "COPY"]
    assert env_vars(parsed) == {"A": "1", "B": "two words", "C": "3"}
    assert copies(parsed)[0].sources == ["a b"]
    assert ignored("app/__pycache__/x.pyc", ["**/__pycache__"])
    assert not ignored("app/main.py", ["**/__pycache__"])
    assert not ignored("a/keep.md", ["a", "!a/keep.md"])


def test_base_image_is_slim_python_matching_pyproject(instructions: list[Instruction]) -> None:
    """Every stage builds FROM a slim official Python whose version pyproject allows."""
    stages: set[str] = set()
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.findall(r"\d+", requires)[:2])
    for ins in _only(instructions, "FROM"):
        words = ins.args.split()
        image = words[0]
        if image not in stages:
            match = SLIM_PYTHON.fullmatch(image)
            assert match, f"line {ins.line}: {image} is not a slim official Python image"
            version = (int(match.group(1)), int(match.group(2)))
            assert version >= minimum, f"{image} vs requires-python {requires}"
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2])


def test_runs_as_a_non_root_user_created_in_the_image(instructions: list[Instruction]) -> None:
    """The last USER is not root, it is created by a RUN, and it comes before CMD."""
    stage = final_stage(instructions)
    users = _only(stage, "USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), "USER is root"
    runs = " ".join(ins.args for ins in _only(stage, "RUN"))
    created = re.search(rf"\b(useradd|adduser)\b[^;&]*\b{re.escape(user)}\b", runs)
    assert created, f"user {user} is never created"
    cmd_line = _only(stage, "CMD")[-1].line
    assert users[-1].line < cmd_line


def test_cmd_serves_with_migrations_via_tunefit_serve(instructions: list[Instruction]) -> None:
    """CMD runs `tunefit serve` (migrate under lock, seed, uvicorn) as PID 1, bound to $HOST:$PORT."""
    stage = final_stage(instructions)
    assert not _only(stage, "ENTRYPOINT"), "an ENTRYPOINT would change what CMD means"
    cmd = _only(stage, "CMD")[-1].exec_form()
    assert cmd is not None, "CMD must be the exec form so `docker stop`'s SIGTERM reaches the server"
    if cmd[:2] == ["sh", "-c"]:
        # Through a shell only with `exec`, otherwise sh is PID 1 and never forwards SIGTERM.
        words = shlex.split(cmd[2])
        assert words[0] == "exec", "sh -c without exec: the server would not get SIGTERM"
        words = words[1:]
    else:
        words = cmd
    assert words[:2] == ["tunefit", "serve"], words
    assert words[words.index("--host") + 1] == "$HOST" and words[words.index("--port") + 1] == "$PORT"


def test_healthcheck_probes_healthz_on_the_served_port(instructions: list[Instruction]) -> None:
    """A HEALTHCHECK exists, is not NONE, and asks /healthz on $PORT with a timeout."""
    checks = _only(final_stage(instructions), "HEALTHCHECK")
    assert checks, "no HEALTHCHECK"
    command = healthcheck_command(checks[-1])
    assert command is not None, "HEALTHCHECK NONE"
    assert "/healthz" in command and "PORT" in command
    assert "--timeout=" in checks[-1].args


def test_env_is_only_tunefit_settings_and_python_knobs(instructions: list[Instruction]) -> None:
    """ENV sets only TUNEFIT_ settings that exist, HOST/PORT, and Python/pip variables."""
    env = env_vars(final_stage(instructions))
    assert {"HOST", "PORT"} <= set(env)
    for name in env:
        assert ALLOWED_ENV.match(name), f"ENV {name} is not a TUNEFIT_ setting, HOST/PORT or a Python knob"
        if name.startswith("TUNEFIT_"):
            assert name in _setting_names(), f"ENV {name} is not a field of app.config.Settings"
    exposed = " ".join(i.args for i in _only(final_stage(instructions), "EXPOSE"))
    assert env["PORT"] in exposed.split(), "EXPOSE does not name the default PORT"
    url = make_url(env["TUNEFIT_DATABASE_URL"])
    assert url.drivername == "sqlite" and url.database and url.database.startswith("/"), url


def test_sqlite_folder_is_owned_by_the_runtime_user(instructions: list[Instruction]) -> None:
    """The default SQLite file's folder is made writable for the non-root user."""
    stage = final_stage(instructions)
    folder = str(make_url(env_vars(stage)["TUNEFIT_DATABASE_URL"]).database).rsplit("/", 1)[0]
    user = _only(stage, "USER")[-1].args.split(":")[0]
    runs = " ".join(ins.args for ins in _only(stage, "RUN"))
    assert re.search(rf"chown\s+(-R\s+)?{re.escape(user)}(:\S+)?\s+{re.escape(folder)}\b", runs), folder


def test_dependencies_come_from_pyproject(instructions: list[Instruction]) -> None:
    """Every pip install in the image installs the project (pyproject), pip itself, or nothing else."""
    runs = [ins for ins in instructions if ins.keyword == "RUN" and "pip install" in ins.args]
    assert runs, "the image installs nothing"
    for ins in runs:
        for chunk in re.split(r"&&|;", ins.args):
            words = shlex.split(chunk)
            if words[:2] != ["pip", "install"]:
                continue
            targets = [w for w in words[2:] if not w.startswith("-")]
            assert targets, f"line {ins.line}: pip install of nothing"
            assert set(targets) <= {".", "pip"}, f"line {ins.line}: installs {targets}, not pyproject"


def test_every_copy_source_exists_and_reaches_the_builder(instructions: list[Instruction]) -> None:
    """Each COPY source exists in the repo and .dockerignore does not drop it; .venv stays out."""
    patterns = dockerignore_patterns()
    for copy in copies(instructions):
        if "from" in copy.flags:
            continue
        for source in copy.sources:
            assert (REPO / source).exists(), f"line {copy.line}: COPY {source}: no such path in the repo"
            assert not ignored(source, patterns), f"line {copy.line}: .dockerignore drops {source}"
    # The context would otherwise carry the virtualenv (the CPU torch wheel alone is gigabytes).
    for heavy in (".venv", ".git", "app/__pycache__/main.cpython-311.pyc", "tunefit.sqlite3"):
        assert ignored(heavy, patterns), f".dockerignore lets {heavy} into the build context"


def test_compose_runs_app_and_postgres_with_a_volume(compose: dict[str, Any]) -> None:
    """Compose: a PostgreSQL service with a named volume and health check, and the app built here."""
    services = compose["services"]
    db = services["db"]
    assert str(db["image"]).startswith("postgres:")
    mounts = [str(v) for v in db.get("volumes", [])]
    named = [m.split(":")[0] for m in mounts if m.endswith(":/var/lib/postgresql/data")]
    assert named and named[0] in (compose.get("volumes") or {}), "PostgreSQL data is not on a named volume"
    assert "healthcheck" in db
    app = services["app"]
    assert app["build"] in (".", "./", {"context": "."})
    assert app["depends_on"]["db"]["condition"] == "service_healthy"


def test_compose_app_points_at_the_db_service(compose: dict[str, Any]) -> None:
    """The app's TUNEFIT_DATABASE_URL names the db service with its user, password and database."""
    services = compose["services"]
    app_env = services["app"]["environment"]
    db_env = services["db"]["environment"]
    url = make_url(app_env["TUNEFIT_DATABASE_URL"])
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "db" and (url.port or 5432) == 5432
    assert url.username == db_env["POSTGRES_USER"] and url.password == db_env["POSTGRES_PASSWORD"]
    assert url.database == db_env["POSTGRES_DB"]
    for name in app_env:
        assert name in _setting_names(), f"compose sets {name}, which is not a tunefit setting"


def test_compose_app_can_be_scaled(compose: dict[str, Any]) -> None:
    """`--scale app=N` needs no fixed container name and a host port range (or none)."""
    app = compose["services"]["app"]
    assert "container_name" not in app, "a fixed container_name forbids --scale"
    for spec in app.get("ports", []):
        host = str(spec).rsplit(":", 1)[0]
        assert "-" in host or "${" in host, f"ports {spec}: a single fixed host port binds only one replica"


# Each mutation breaks the Dockerfile in one way; the check named beside it must notice.
BASE, USER, CMD, ENV = (
    test_base_image_is_slim_python_matching_pyproject,
    test_runs_as_a_non_root_user_created_in_the_image,
    test_cmd_serves_with_migrations_via_tunefit_serve,
    test_env_is_only_tunefit_settings_and_python_knobs,
)
DEPS, COPIES = test_dependencies_come_from_pyproject, test_every_copy_source_exists_and_reaches_the_builder
MUTATIONS = [
    ("FROM python:3.11-slim AS base", "FROM python:3.11 AS base", BASE),
    ("FROM python:3.11-slim AS base", "FROM python:3.10-slim AS base", BASE),
    ("USER tunefit", "USER root", USER),
    ("HEALTHCHECK", "# HEALTHCHECK", test_healthcheck_probes_healthz_on_the_served_port),
    ('CMD ["sh", "-c", "exec tunefit', 'CMD ["sh", "-c", "tunefit', CMD),
    ("ENV TUNEFIT_DATABASE_URL=", "ENV TUNEFIT_DB_URL=", ENV),
    ("PORT=8000", "PORT=8000 \\\n    APP_MODE=prod", ENV),
    ("chown -R tunefit", "chown -R root", test_sqlite_folder_is_owned_by_the_runtime_user),
    ("pip install --upgrade pip", "pip install --upgrade pip requests", DEPS),
    ("COPY data ./data", "COPY data ./data\nCOPY settings.toml ./", COPIES),
]


@pytest.mark.parametrize(("old", "new", "check"), MUTATIONS, ids=[m[1].split("\n")[-1] for m in MUTATIONS])
def test_each_check_rejects_a_broken_dockerfile(old: str, new: str, check: Any) -> None:
    """Each static check fails on a Dockerfile broken in the way it guards against (no vacuous checks)."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert old in text, f"the mutation's anchor {old!r} is gone from the Dockerfile: update MUTATIONS"
    with pytest.raises(AssertionError):
        check(parse(text.replace(old, new, 1)))
