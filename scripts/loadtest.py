"""Load test: requests/s and errors of GET /healthz vs GET /api/estimate on one real uvicorn (loopback).

Starts `tunefit serve` (1 uvicorn worker, a fresh seeded SQLite database) unless --url is given, then
alternates short rounds of each endpoint (so background noise hits both alike) under a fixed number of
keep-alive connections, driven by a small raw-HTTP/1.1 client in one or more processes. It also
measures the client alone against a do-nothing HTTP server (its ceiling) and the server's CPU use, so
the report shows which side was the bottleneck. Exit status 1 when estimate < 0.5 x healthz or any
request failed.

    .venv/bin/python scripts/loadtest.py                  # the figures in docs/load-test.md
    .venv/bin/python scripts/loadtest.py --rounds 2 --duration 2 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # loopback only: this tool never targets another machine
HEALTHZ = "/healthz"
ESTIMATE = (
    "/api/estimate?model=llama-3.1-8b&method=qlora&gpu=rtx-4090&batch_size=4&seq_len=512"
    "&dataset_samples=5000&epochs=3"
)
REQUIRED_RATIO = 0.5


@dataclass
class Tally:
    """What one client process saw in one phase."""

    ok: int = 0
    errors: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    cpu_s: float = 0.0


@dataclass
class Phase:
    """One endpoint's totals over all its rounds."""

    path: str
    seconds: float = 0.0
    ok: int = 0
    errors: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    server_cpu_s: float | None = 0.0
    client_cpu_s: float = 0.0

    def add(self, tallies: list[Tally], seconds: float, server_cpu_s: float | None) -> None:
        """Fold one round's client tallies in."""
        self.seconds += seconds
        for tally in tallies:
            self.ok += tally.ok
            self.errors += tally.errors
            self.statuses.update(tally.statuses)
            self.latencies.extend(tally.latencies)
            self.client_cpu_s += tally.cpu_s
        self.server_cpu_s = None if server_cpu_s is None or self.server_cpu_s is None else (
            self.server_cpu_s + server_cpu_s)

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return self.ok / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        """The figures as plain JSON."""
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else None

        return {
            "path": self.path,
            "seconds": round(self.seconds, 2),
            "requests": self.ok,
            "errors": self.errors,
            "statuses": dict(self.statuses),
            "rps": round(self.rps, 1),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else None,
            "server_cpu": None if self.server_cpu_s is None else round(self.server_cpu_s / self.seconds, 2),
            # CPU per request: the server's capacity on one core, whatever share of it this run got.
            "server_cpu_ms_per_request": None if self.server_cpu_s is None or not self.ok else round(
                self.server_cpu_s / self.ok * 1000, 3),
            "client_cpu": round(self.client_cpu_s / self.seconds, 2) if self.seconds else None,
        }


# --- the client: raw HTTP/1.1 keep-alive over asyncio streams (httpx would be the bottleneck) -------

async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; returns (status, server closes the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        start = lower.find(b"\r\ncontent-length:")
        if start >= 0:
            end = lower.index(b"\r\n", start + 2)
            await reader.readexactly(int(lower[start + 17:end]))
    return status, b"\r\nconnection: close" in lower


async def _connection(port: int, requests: list[bytes], first: int, start_at: float, end_at: float,
                      tally: Tally) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    index = first
    try:
        while (sent := time.monotonic()) < end_at:
            writer.write(requests[index % len(requests)])
            index += 1
            try:
                status, closing = await _read_response(reader)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, ValueError) as exc:
                tally.errors += 1
                tally.statuses[type(exc).__name__] += 1
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
                continue
            done = time.monotonic()
            if done > end_at:
                break  # finished after the window closed: neither counted nor an error
            if status == 200:
                tally.ok += 1
            else:
                tally.errors += 1
            tally.statuses[str(status)] += 1
            tally.latencies.append(done - sent)
            if closing:
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _client_main(port: int, paths: list[str], first: int, connections: int, start_at: float, end_at: float,
                 out: multiprocessing.connection.Connection) -> None:
    """One client process: `connections` keep-alive connections until `end_at`; sends back a Tally."""
    with contextlib.suppress(ImportError):
        import uvloop  # a faster event loop keeps the client further from being the bottleneck

        uvloop.install()
    head = f"HTTP/1.1\r\nHost: {HOST}:{port}\r\nAccept: */*\r\n\r\n"
    requests = [f"GET {path} {head}".encode() for path in paths]
    tally = Tally()
    cpu0 = time.process_time()

    async def run() -> None:
        # Connections start at spread-out offsets so that, with many paths, each sends different ones.
        step = max(1, len(requests) // max(1, connections))
        await asyncio.gather(*(_connection(port, requests, first + k * step, start_at, end_at, tally)
                               for k in range(connections)))

    asyncio.run(run())
    tally.cpu_s = time.process_time() - cpu0
    out.send(tally)
    out.close()


def run_round(port: int, paths: list[str], duration: float, connections: int, clients: int) -> list[Tally]:
    """Drive `paths` (cycled) for `duration` seconds from `clients` processes; returns their tallies."""
    ctx = multiprocessing.get_context("fork")
    start_at = time.monotonic() + 0.3  # every process connects first, then all start together
    end_at = start_at + duration
    procs: list[tuple[Any, multiprocessing.connection.Connection]] = []
    for i in range(clients):
        share = connections // clients + (1 if i < connections % clients else 0)
        recv, send = ctx.Pipe(duplex=False)
        first = i * len(paths) // clients
        proc = ctx.Process(target=_client_main, args=(port, paths, first, share, start_at, end_at, send),
                           daemon=True)
        proc.start()
        send.close()
        procs.append((proc, recv))
    tallies = []
    for proc, recv in procs:
        if not recv.poll(duration + 30):
            proc.kill()
            raise RuntimeError("a client process did not report back")
        tallies.append(recv.recv())
        proc.join(5)
    return tallies


# --- the server under test, and a do-nothing server for the client's ceiling -----------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float | None:
    """utime+stime of `pid` from /proc (None where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


@contextlib.contextmanager
def tunefit_server(log_path: Path) -> Iterator[tuple[int, int]]:
    """`tunefit serve` on a fresh SQLite file in a temporary folder; yields (port, pid)."""
    exe = Path(sys.executable).with_name("tunefit")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from app.cli import main; "
                                            "sys.exit(main())"]
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="tunefit-load-") as tmp:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "TUNEFIT_DATABASE_URL": f"sqlite:///{tmp}/tunefit.sqlite3", "TUNEFIT_LOG_LEVEL": "WARNING"}
        with log_path.open("wb") as log:
            proc = subprocess.Popen([*argv, "serve", "--host", HOST, "--port", str(port)], env=env, cwd=tmp,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"tunefit serve exited: {log_path.read_text()[-3000:]}")
                with contextlib.suppress(OSError):
                    if _get(f"http://{HOST}:{port}{HEALTHZ}", timeout=2)[0] == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("tunefit serve did not become healthy in 60 s")
                time.sleep(0.2)
            yield port, proc.pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _fixed_response_server(port: int, ready: Any) -> None:
    """The cheapest HTTP server asyncio allows: reads a request head, answers a fixed 200."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
                self.transport.write(reply)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Proto, HOST, port)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def measure_ceiling(duration: float, connections: int, clients: int) -> Phase:
    """The client's own throughput against a server that does nothing."""
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    ready = ctx.Event()
    server = ctx.Process(target=_fixed_response_server, args=(port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(10):
            raise RuntimeError("the fixed-response server did not start")
        phase = Phase("fixed 200 (client ceiling)")
        assert server.pid is not None
        cpu0 = _cpu_seconds(server.pid)
        tallies = run_round(port, ["/"], duration, connections, clients)
        cpu1 = _cpu_seconds(server.pid)
        phase.add(tallies, duration, None if cpu0 is None or cpu1 is None else cpu1 - cpu0)
        return phase
    finally:
        server.kill()
        server.join(5)


def check_estimate(port: int) -> dict[str, Any]:
    """One estimate by hand: the load test must hit the real computation, not a fast error path."""
    status, body = _get(f"http://{HOST}:{port}{ESTIMATE}", timeout=30)
    if status != 200:
        raise RuntimeError(f"GET {ESTIMATE} answered {status}: {body[:500]!r}")
    data = json.loads(body)
    if not (data["memory"]["fits"] and data["time"]["steps"] == 3750 and data["cost"]["options"]):
        raise RuntimeError(f"unexpected estimate: {json.dumps(data)[:800]}")
    return {"peak_gib": data["memory"]["peak_gib"], "steps": data["time"]["steps"],
            "cost_options": len(data["cost"]["options"])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole measurement; returns the report."""
    phases = {HEALTHZ: Phase(HEALTHZ), ESTIMATE: Phase(ESTIMATE)}
    paths = {HEALTHZ: [HEALTHZ], ESTIMATE: [ESTIMATE]}
    if args.vary:
        # Distinct batch/seq pairs defeat the core's per-shape caches: the cost of a first-time request.
        name = f"/api/estimate ({args.vary} distinct)"
        phases[name] = Phase(name)
        paths[name] = [ESTIMATE.replace("batch_size=4&seq_len=512",
                                        f"batch_size={1 + i % 32}&seq_len={128 + 16 * (i // 32)}")
                       for i in range(args.vary)]
    with tempfile.TemporaryDirectory(prefix="tunefit-loadlog-") as logdir, \
            tunefit_server(Path(logdir) / "server.log") as (port, pid):
        checked = check_estimate(port)
        for path in (HEALTHZ, ESTIMATE):  # warm-up: pools, caches, first-call imports; not counted
            run_round(port, paths[path], args.warmup, args.connections, args.clients)
        for round_no in range(args.rounds):
            # ABBA order: a load drift on this machine during the run hits both endpoints alike.
            order = list(phases.items()) if round_no % 2 == 0 else list(reversed(phases.items()))
            for path, phase in order:
                cpu0 = _cpu_seconds(pid)
                tallies = run_round(port, paths[path], args.duration, args.connections, args.clients)
                cpu1 = _cpu_seconds(pid)
                phase.add(tallies, args.duration, None if cpu0 is None or cpu1 is None else cpu1 - cpu0)
    report: dict[str, Any] = {
        "connections": args.connections, "clients": args.clients, "rounds": args.rounds,
        "duration_s": args.duration, "cpus": os.cpu_count(), "estimate_check": checked,
        "phases": [p.summary() for p in phases.values()],
    }
    if args.ceiling:
        report["ceiling"] = measure_ceiling(args.ceiling, args.connections, args.clients).summary()
    health, estimate = phases[HEALTHZ], phases[ESTIMATE]
    report["ratio"] = round(estimate.rps / health.rps, 3) if health.rps else 0.0
    cpu_health, cpu_estimate = (p.summary()["server_cpu_ms_per_request"] for p in (health, estimate))
    report["cpu_ratio"] = round(cpu_health / cpu_estimate, 3) if cpu_health and cpu_estimate else None
    report["errors"] = sum(p.errors for p in phases.values())
    report["passed"] = report["ratio"] >= REQUIRED_RATIO and report["errors"] == 0 and estimate.ok > 0
    return report


def print_table(report: dict[str, Any]) -> None:
    """The report as a plain-text table."""
    rows = [*report["phases"], *([report["ceiling"]] if "ceiling" in report else [])]
    print(f"{report['connections']} connections from {report['clients']} client process(es), "
          f"{report['rounds']} x {report['duration_s']} s per endpoint, {report['cpus']} CPUs")
    head = f"{'endpoint':<28}{'requests':>9}{'req/s':>9}{'errors':>7}{'p50 ms':>8}{'p99 ms':>8}"
    print(head + f"{'server CPU':>11}{'CPU ms/req':>11}{'client CPU':>11}")
    for row in rows:
        name = row["path"].split("?")[0] if row["path"].startswith("/") else row["path"]
        server = "-" if row["server_cpu"] is None else f"{row['server_cpu']:.0%}"
        ms = row["server_cpu_ms_per_request"]
        per_request = "-" if ms is None else f"{ms:.2f}"
        print(f"{name:<28}{row['requests']:>9}{row['rps']:>9.0f}{row['errors']:>7}{row['p50_ms']!s:>8}"
              f"{row['p99_ms']!s:>8}{server:>11}{per_request:>11}{row['client_cpu']:>11.0%}")
    verdict = "PASS" if report["passed"] else "FAIL"
    print(f"estimate / healthz = {report['ratio']:.2f} req/s (needs >= {REQUIRED_RATIO}; by server CPU per "
          f"request {report['cpu_ratio']}), errors {report['errors']}: {verdict}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round per endpoint")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per endpoint")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured warm-up seconds per endpoint")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections in all")
    parser.add_argument("--clients", type=int, default=1, help="client processes sharing the connections")
    parser.add_argument("--ceiling", type=float, default=3.0,
                        help="seconds against a do-nothing server to show the client's ceiling (0: skip)")
    parser.add_argument("--vary", type=int, default=0,
                        help="also time N distinct estimates (cold core caches); not in the ratio")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 60 and 1 <= args.rounds <= 20 and 1 <= args.connections <= 512
            and 1 <= args.clients <= 16 and 0 <= args.ceiling <= 60 and 0 <= args.warmup <= 30
            and 0 <= args.vary <= 100_000):
        parser.error("out of bounds: duration (0, 60], rounds 1-20, connections 1-512, clients 1-16")
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
