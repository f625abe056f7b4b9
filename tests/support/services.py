"""Real services for tests, started as processes on free ports: redis-server, an S3 server (moto),
the gateway under uvicorn, Celery workers. Each can be killed and restarted by the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(interval)
    raise TimeoutError(f"Timed out after {timeout}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def redis_server_binary() -> str:
    """redis-server from PATH, or from the `redis-server` PyPI package when the system has none."""
    found = shutil.which("redis-server")
    if found:
        return found
    candidate = Path(sys.prefix) / "bin" / "redis-server"
    if candidate.exists():
        return str(candidate)
    raise RuntimeError(
        "redis-server is not installed (apt-get install redis-server, or pip install redis-server)"
    )


@dataclass
class ManagedProcess:
    """A child process in its own session, so that it and its children can be killed together."""

    args: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    log_path: Path | None = None
    process: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                list(self.args),
                env={**os.environ, **self.env},
                cwd=self.cwd,
                stdout=log or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if log is not None:
                log.close()  # the child has its own copy of the descriptor
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


class RedisServer:
    """A redis-server with AOF (appendfsync always), so a restart keeps every acknowledged write."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = ManagedProcess(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
            ],
            log_path=self.workdir / "redis.log",
        ).start()
        wait_for(lambda: port_open(self.port), 10, "redis-server")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def restart(self) -> None:
        if self.proc is not None and self.proc.alive():
            self.proc.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()


class S3Server:
    """moto's S3 server as a separate process."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = ManagedProcess(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            log_path=self.workdir / "moto.log",
        ).start()
        wait_for(lambda: port_open(self.port), 30, "moto S3 server")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def kiln_process(args: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path) -> ManagedProcess:
    """``python -m kiln ARGS`` with the repository importable (for the test node modules)."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return ManagedProcess(
        [sys.executable, "-m", "kiln", *args],
        env={"PYTHONPATH": pythonpath, **env},
        cwd=cwd,
        log_path=log_path,
    ).start()
