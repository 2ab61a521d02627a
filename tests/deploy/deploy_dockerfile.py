"""A small Dockerfile reader: instructions, ENV, COPY and .dockerignore, as the builder sees them."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Instruction:
    """One instruction: its keyword (upper case), its argument text and the line it starts on."""

    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of the arguments, or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"line {self.line}: exec form must be a JSON list of strings")
        return value


@dataclass(frozen=True)
class Copy:
    """A COPY/ADD instruction split into flags, sources and destination."""

    flags: dict[str, str]
    sources: list[str]
    dest: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, joining `\\` continuations and dropping comments."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        # Docker drops comment lines and blank lines even inside a continued instruction.
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    if pending:
        raise ValueError(f"line {start}: the file ends inside a continued instruction")
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last build stage (from its FROM on)."""
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    if not starts:
        raise ValueError("no FROM instruction")
    return instructions[starts[-1]:]


def env_vars(instructions: list[Instruction]) -> dict[str, str]:
    """Every ENV variable set, in order, later values winning (both `k=v ...` and `k v` forms)."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword != "ENV":
            continue
        words = shlex.split(ins.args)
        if words and "=" not in words[0]:
            env[words[0]] = ins.args.split(None, 1)[1] if len(words) > 1 else ""
            continue
        for word in words:
            name, sep, value = word.partition("=")
            if not sep:
                raise ValueError(f"line {ins.line}: ENV word {word!r} lacks '='")
            env[name] = value
    return env


def copies(instructions: list[Instruction]) -> list[Copy]:
    """The COPY and ADD instructions, parsed."""
    out: list[Copy] = []
    for ins in instructions:
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = ins.exec_form() or shlex.split(ins.args)
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        if len(words) < 2:
            raise ValueError(f"line {ins.line}: COPY needs a source and a destination")
        out.append(Copy(flags, words[:-1], words[-1], ins.line))
    return out


def healthcheck_command(ins: Instruction) -> str | None:
    """The command of a HEALTHCHECK (shell text), or None for `HEALTHCHECK NONE`."""
    match = re.match(r"^((?:--\S+\s+)*)(CMD|NONE)\b\s*(.*)$", ins.args, flags=re.IGNORECASE | re.DOTALL)
    if match is None:
        raise ValueError(f"line {ins.line}: cannot read HEALTHCHECK {ins.args!r}")
    if match.group(2).upper() == "NONE":
        return None
    body = match.group(3).strip()
    if body.startswith("["):
        words = json.loads(body)
        # ["CMD-SHELL", "..."] and ["CMD", ...] are the exec forms of a health check.
        if words[0] == "CMD-SHELL":
            return str(words[1])
        return shlex.join(words[1:] if words[0] == "CMD" else words)
    return body


def dockerignore_patterns(root: Path = REPO) -> list[str]:
    """The patterns of `.dockerignore` (empty when there is none)."""
    path = root / ".dockerignore"
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _match(pattern: str, rel: str) -> bool:
    pattern = pattern.strip("/")
    if pattern.startswith("**/"):
        tail = pattern[3:]
        parts = rel.split("/")
        return any(fnmatch.fnmatchcase("/".join(parts[i:]), tail) for i in range(len(parts)))
    return fnmatch.fnmatchcase(rel, pattern)


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether the builder leaves `rel` (a path relative to the context) out; `!` re-includes."""
    parts = rel.strip("/").split("/")
    # A path is out when it or any folder above it matches; the last matching pattern decides.
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        if any(_match(body, prefix) for prefix in prefixes):
            result = not negate
    return result


def copy_into(copy: Copy, context: Path, workdir: Path, patterns: list[str]) -> None:
    """Do what COPY does: sources from the build context into the image's WORKDIR-relative dest."""
    dest = Path(copy.dest) if copy.dest.startswith("/") else workdir / copy.dest
    into_dir = copy.dest.endswith("/") or len(copy.sources) > 1
    for source in copy.sources:
        src = context / source
        if src.is_dir():
            _copy_tree(src, dest, context, patterns)
        else:
            target = dest / src.name if into_dir else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def _copy_tree(src: Path, dest: Path, context: Path, patterns: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(context).as_posix()
        if ignored(rel, patterns):
            continue
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
