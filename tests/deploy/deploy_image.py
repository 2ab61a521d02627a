"""Lay out the Docker image's files and interpreter without Docker, to run its CMD for real.

The image is rebuilt from the Dockerfile itself: its COPY instructions fill a fresh WORKDIR (through
.dockerignore), its RUN steps are replayed (the project's pip install, mkdir, chown, useradd), its ENV
is applied with the WORKDIR prefix mapped into the temporary root. The interpreter is a fresh venv with
no site packages; the only third-party code it can import is the closure of pyproject's runtime
dependencies, linked file by file from this checkout's .venv (no network: the same versions `pip
install .` resolves here). An import of anything undeclared therefore fails as it would in the image.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from deploy_dockerfile import (
    REPO,
    Instruction,
    copies,
    copy_into,
    dockerignore_patterns,
    env_vars,
    final_stage,
    healthcheck_command,
    parse,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PY = f"python{sys.version_info.major}.{sys.version_info.minor}"


@dataclass
class Image:
    """The laid-out image: where its WORKDIR and venv are, its ENV, CMD and runtime user."""

    root: Path
    workdir: Path
    venv: Path
    env: dict[str, str]
    cmd: list[str]
    healthcheck: str | None
    uid: int | None

    def path_env(self) -> dict[str, str]:
        """The ENV plus what the python base image sets (PATH with its interpreter first, LANG)."""
        return {**self.env, "PATH": f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                "HOME": str(self.workdir)}


def _requirement_closure(requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions that `requirements` pull in, extras and markers evaluated."""
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    queue: list[tuple[Requirement, str]] = [(Requirement(r), "") for r in requirements]
    while queue:
        req, extra = queue.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        dist = found.get(name) or metadata.distribution(req.name)
        found[name] = dist
        for wanted in ("", *sorted(req.extras)):
            if (name, wanted) in done:
                continue
            done.add((name, wanted))
            queue.extend((Requirement(r), wanted) for r in dist.requires or [])
    return list(found.values())


def _link_distributions(dists: list[metadata.Distribution], target: Path) -> None:
    """Symlink every recorded file of `dists` (and its existing bytecode) under `target`."""
    for dist in dists:
        for file in dist.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # console scripts live outside site-packages; bytecode is linked below
            source = Path(str(dist.locate_file(file)))
            dest = target / file
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                dest.symlink_to(source)
            # Linking the compiled bytecode keeps the start fast: sources are links, so mtimes match.
            if source.suffix == ".py":
                pyc = source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"
                if pyc.exists():
                    (dest.parent / "__pycache__").mkdir(exist_ok=True)
                    link = dest.parent / "__pycache__" / pyc.name
                    if not link.exists():
                        link.symlink_to(pyc)


def _base_python(uid: int | None) -> str:
    """An interpreter of this Python version that `uid` may run (pyenv under /root may be closed)."""
    candidates = [getattr(sys, "_base_executable", sys.executable), f"/usr/bin/{PY}", f"/usr/local/bin/{PY}"]
    for candidate in candidates:
        if not Path(candidate).exists():
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sqlite3, ssl"], user=uid, group=uid,
                extra_groups=[] if uid is not None else None, capture_output=True, timeout=30,
            )
        except PermissionError:
            continue
        if probe.returncode == 0:
            return candidate
    raise RuntimeError(f"no {PY} interpreter that uid {uid} can run among {candidates}")


def _map(value: str, workdir_in_image: str, workdir: Path) -> str:
    return value.replace(workdir_in_image, str(workdir))


def _replay_runs(runs: list[Instruction], workdir_in_image: str, image: Image, build_deps: Path) -> None:
    """Replay each RUN's steps; a step this emulator does not know fails loudly instead of being skipped."""
    for ins in runs:
        for chunk in re.split(r"&&|;", ins.args):
            words = shlex.split(chunk)
            if not words:
                continue
            if words[:2] == ["pip", "install"] and "--no-deps" in words:
                _pip_install_project(words, image, build_deps)
            elif words[:2] in (["pip", "install"], ["pip", "uninstall"]):
                continue  # the dependency layer: here the linked closure stands in for it
            elif words[0] == "apt-get" or words[:2] == ["rm", "-rf"]:
                continue  # the build compiler: this machine has gcc, and the apt lists are not laid out
            elif words[0] in ("useradd", "adduser"):
                continue  # build() read the uid already: the interpreter must suit that user
            elif words[0] == "mkdir":
                for path in (w for w in words[1:] if not w.startswith("-")):
                    Path(_map(path, workdir_in_image, image.workdir)).mkdir(parents=True, exist_ok=True)
            elif words[0] == "chown":
                paths = [w for w in words[1:] if not w.startswith("-")][1:]
                for path in paths:
                    _chown_tree(Path(_map(path, workdir_in_image, image.workdir)), image.uid)
            else:
                raise NotImplementedError(f"Dockerfile line {ins.line}: cannot replay {chunk.strip()!r}")


def _chown_tree(path: Path, uid: int | None) -> None:
    if uid is None:
        return
    for item in [path, *path.rglob("*")]:
        os.chown(item, uid, uid, follow_symlinks=False)


def _pip_install_project(words: list[str], image: Image, build_deps: Path) -> None:
    """`pip install --no-deps [-e] .` into the clean venv, its build backend visible only meanwhile."""
    site = image.venv / "lib" / PY / "site-packages"
    build_pth = site / "tunefit_build_deps.pth"
    build_pth.write_text(f"{build_deps}\n")
    try:
        flags = [w for w in words[2:] if w.startswith("-")]
        done = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(image.venv / "bin" / "python"), "install", "-q",
             "--no-index", "--no-build-isolation", *flags, "."],
            cwd=image.workdir, capture_output=True, text=True, timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the image's `{' '.join(words)}` failed:\n{done.stderr[-3000:]}")
    finally:
        build_pth.unlink()


def build(dockerfile: Path = REPO / "Dockerfile") -> Image:
    """Lay the image out under a fresh temporary root (the caller removes `image.root`)."""
    instructions = final_stage(parse(dockerfile.read_text(encoding="utf-8")))
    workdirs = [ins.args for ins in instructions if ins.keyword == "WORKDIR"]
    workdir_in_image = workdirs[-1] if workdirs else "/"
    root = Path(tempfile.mkdtemp(prefix="tunefit-image-", dir="/tmp"))
    try:
        return _build_into(root, instructions, workdir_in_image)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)  # the caller never sees `root`, so it cannot remove it
        raise


def _build_into(root: Path, instructions: list[Instruction], workdir_in_image: str) -> Image:
    root.chmod(0o755)  # the runtime user must reach its WORKDIR, as in the image
    workdir = root / workdir_in_image.lstrip("/")
    workdir.mkdir(parents=True)
    for part in [*workdir.relative_to(root).parents, workdir.relative_to(root)]:
        (root / part).chmod(0o755)
    patterns = dockerignore_patterns()
    for copy in copies(instructions):
        copy_into(copy, REPO, workdir, patterns)

    cmd = next(ins for ins in reversed(instructions) if ins.keyword == "CMD").exec_form()
    assert cmd is not None
    env = {k: _map(v, workdir_in_image, workdir) for k, v in env_vars(instructions).items()}
    checks = [ins for ins in instructions if ins.keyword == "HEALTHCHECK"]
    health = healthcheck_command(checks[-1]) if checks else None
    image = Image(root, workdir, root / "venv", env, cmd, health, None)
    # Only root can switch users; then the server runs under the uid the Dockerfile's useradd gives.
    for ins in instructions:
        match = re.search(r"useradd\b.*--uid\s+(\d+)", ins.args) if ins.keyword == "RUN" else None
        if match and os.geteuid() == 0:
            image.uid = int(match.group(1))
    try:
        base = _base_python(image.uid)
    except RuntimeError:
        image.uid = None  # no interpreter the user can reach: run as ourselves (still non-writing checks)
        base = _base_python(None)
    subprocess.run([base, "-m", "venv", "--without-pip", str(image.venv)], check=True, timeout=60)
    image.venv.chmod(0o755)

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    deps = root / "deps"
    _link_distributions(_requirement_closure(pyproject["project"]["dependencies"]), deps)
    build_deps = root / "build-deps"
    _link_distributions(_requirement_closure(pyproject["build-system"]["requires"]), build_deps)
    site = image.venv / "lib" / PY / "site-packages"
    (site / "tunefit_image_deps.pth").write_text(f"{deps}\n")

    _replay_runs([ins for ins in instructions if ins.keyword == "RUN"], workdir_in_image, image, build_deps)
    shutil.rmtree(build_deps)
    if image.uid is not None and not _user_can_import(image):
        # The linked dependencies live in this checkout's .venv; where the runtime user cannot read
        # it (a checkout under a private home), run as ourselves rather than fail for that reason.
        image.uid = None
    return image


def _user_can_import(image: Image) -> bool:
    probe = subprocess.run(
        [str(image.venv / "bin" / "python"), "-c", "import fastapi, sqlalchemy, uvicorn, app"],
        cwd=image.workdir, env=image.path_env(), user=image.uid, group=image.uid, extra_groups=[],
        capture_output=True, timeout=60,
    )
    return probe.returncode == 0


def snapshot(tree: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Path -> (size, mtime_ns) of every file under `tree` except under `skip`."""
    out: dict[str, tuple[int, int]] = {}
    for path in tree.rglob("*"):
        if path == skip or skip in path.parents or path.is_dir():
            continue
        stat = path.lstat()
        out[str(path.relative_to(tree))] = (stat.st_size, stat.st_mtime_ns)
    return out
