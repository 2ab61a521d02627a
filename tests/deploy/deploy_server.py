"""Run real server processes on loopback (deploy, CLI and browser tests), and always reap them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    """A minimal environment for a server: no TUNEFIT_ leaking in from the test run."""
    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(extra)
    return env


def serve_argv(port: int) -> list[str]:
    """The real command: the console script `tunefit serve` of the test's virtualenv."""
    return [str(VENV_BIN / "tunefit"), "serve", "--host", LOOPBACK, "--port", str(port)]


@dataclass
class Server:
    """A running server process and where its output goes."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        """The loopback base URL."""
        return f"http://{LOOPBACK}:{self.port}"

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_healthy(self, timeout: float) -> float:
        """Poll /healthz until 200; returns seconds taken; raises with the log if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-6000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            time.sleep(0.1)
        raise TimeoutError(f"server not healthy within {timeout}s:\n{self.log_text()[-6000:]}")

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM the group (as `docker stop` does); the exit status, or None if it had to be killed."""
        status: int | None = self.proc.poll()
        if status is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                status = self.proc.wait(timeout)
        # Whatever is left in the group (a stray child) is killed too, so no test leaks processes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        return status


def start(
    argv: Sequence[str],
    env: Mapping[str, str],
    port: int,
    log_path: Path,
    cwd: Path,
    user: int | None = None,
) -> Server:
    """Start `argv` in its own process group with output to `log_path`."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, user=user, group=user,
            extra_groups=[] if user is not None else None,
        )
    return Server(proc, port, log_path)


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    env: Mapping[str, str],
    port: int,
    log_path: Path,
    cwd: Path,
    timeout: float = 45,
    user: int | None = None,
) -> Iterator[Server]:
    """A healthy server for the `with` block; stopped (and its group killed) afterwards."""
    server = start(argv, env, port, log_path, cwd, user)
    try:
        server.wait_healthy(timeout)
        yield server
    finally:
        server.stop()
