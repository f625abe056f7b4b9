"""``kiln up``: the whole service on one machine with one command.

Starts, each as a child process in its own process group:
- ``redis-server`` (unless ``--redis-url`` / ``KILN_REDIS_URL`` names one), data under
  ``STATE/redis`` with AOF on, listening on 127.0.0.1 only;
- the gateway (``kiln serve``);
- one worker per visible GPU (``kiln worker`` with ``KILN_GPU=N``), or one CPU worker without a GPU.

Storage is ``--storage-url`` / ``KILN_STORAGE_URL``, else ``file://STATE/storage``. Without API keys
(``--api-keys``, ``KILN_API_KEYS``, ``KILN_API_KEYS_FILE`` or the config file) the gateway runs in
insecure local mode. Every setting of ``kiln serve`` and ``kiln worker`` is accepted as a flag and
handed to the children as its ``KILN_*`` variable (a flag both use, like ``--redis-url``, reaches
both). Ctrl+C or SIGTERM stops the workers (a running job goes back to the queue), then the
gateway, then Redis.

GPUs are counted without importing torch here: ``CUDA_VISIBLE_DEVICES`` when set, else
``nvidia-smi -L``, else torch in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from engine.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_settings_options
from engine.errors import ConfigError

log = logging.getLogger("kiln.up")

# Settings `kiln up` decides per worker; they are not flags of `kiln up`.
PER_WORKER = ("worker_id", "gpu")
# Runs a child with "die with the parent" (Linux PR_SET_PDEATHSIG), then execs the real command:
# a `kill -9` of `kiln up` does not leave Redis, the gateway or workers behind.
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def register(commands: argparse._SubParsersAction) -> None:
    from api.settings import GatewaySettings
    from engine.settings import EngineSettings
    from worker.settings import WorkerSettings

    up = commands.add_parser(
        "up",
        help="run Redis, the gateway and one worker per GPU on this machine",
        # Gateway and worker settings share names (--redis-url, --storage-url, --s3-*): one flag each.
        conflict_handler="resolve",
    )
    up.add_argument("--config", type=Path, help="YAML or TOML settings file (also KILN_CONFIG)")
    up.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("KILN_STATE_DIR", ".kiln")),
        help="Redis data, file storage, secrets (env KILN_STATE_DIR; default ./.kiln)",
    )
    up.add_argument(
        "--gpus",
        default="auto",
        help="GPUs to run workers on: 'auto' (every visible GPU), '0,1', or 'none' (one CPU worker)",
    )
    add_settings_options(up, WorkerSettings)
    add_settings_options(up, GatewaySettings)
    add_settings_options(up, EngineSettings)
    for name in PER_WORKER:  # set per worker by `kiln up`: hidden, refused when given
        up.add_argument(f"--{name.replace('_', '-')}", dest=name, help=argparse.SUPPRESS)
    up.set_defaults(handler=command_up)


# -- GPUs -------------------------------------------------------------------------------------------


def gpus_from_cuda_visible_devices(value: str) -> list[str]:
    """The entries of CUDA_VISIBLE_DEVICES (indices or GPU-/MIG- UUIDs); CUDA stops at the first
    invalid entry, and ``-1`` or empty hides every GPU."""
    found: list[str] = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry or entry.startswith("-"):
            break
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        found.append(entry)
    return found


def gpus_from_nvidia_smi(output: str) -> list[str]:
    """GPU indices from ``nvidia-smi -L`` ("GPU 0: NVIDIA H100 (UUID: GPU-...)"; MIG lines skipped)."""
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", output, flags=re.MULTILINE)]


def detect_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs this machine shows a CUDA program, without initialising CUDA in this process."""
    environ = dict(os.environ) if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return gpus_from_cuda_visible_devices(environ["CUDA_VISIBLE_DEVICES"])
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            result = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
            if result.returncode == 0:
                return gpus_from_nvidia_smi(result.stdout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("nvidia-smi failed (%s); asking torch", exc)
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
        )
        count = int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else 0
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        count = 0
    return [str(i) for i in range(count)]


# -- settings -----------------------------------------------------------------------------------------


def env_value(value: Any, no_decode: bool) -> str:
    """A flag's value as its ``KILN_*`` environment variable reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        if no_decode:  # the setting splits the text itself (models_dirs: os.pathsep)
            return os.pathsep.join(str(v) for v in value)
        return json.dumps([str(v) for v in value])
    return str(value)


def flags_as_env(args: argparse.Namespace) -> dict[str, str]:
    """``KILN_NAME=value`` for every setting given as a flag."""
    from pydantic_settings import NoDecode

    from api.settings import GatewaySettings
    from engine.settings import EngineSettings
    from worker.settings import WorkerSettings

    env: dict[str, str] = {}
    for settings_class in (WorkerSettings, GatewaySettings, EngineSettings):
        for name, info in settings_class.model_fields.items():
            value = getattr(args, name, None)
            if value is None or name in PER_WORKER:
                continue
            no_decode = any(item is NoDecode for item in info.metadata)
            if name == "queues" and isinstance(value, str):  # a list without its own parser
                value = [q.strip() for q in value.split(",") if q.strip()]
            env[f"KILN_{name.upper()}"] = env_value(value, no_decode)
    return env


def config_values(config: Path | None, section: str) -> dict[str, Any]:
    from engine.settings import read_config_file

    path = config or (Path(os.environ["KILN_CONFIG"]) if os.environ.get("KILN_CONFIG") else None)
    return read_config_file(path, section) if path else {}


def is_given(name: str, env: dict[str, str], config: Path | None) -> bool:
    """Whether a setting was chosen (flag, environment or config file) rather than defaulted."""
    if f"KILN_{name.upper()}" in env:
        return True
    return any(name in config_values(config, section) for section in ("gateway", "worker"))


def url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- children -----------------------------------------------------------------------------------------


@dataclass
class Child:
    """One process of the stack, in its own process group, its output prefixed with its name."""

    name: str
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, out: IO[str]) -> None:
        command = list(self.args)
        if sys.platform.startswith("linux"):
            command = [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *command]
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stream = self.process.stdout
        assert stream is not None
        threading.Thread(target=_pump, args=(self.name, stream, out), daemon=True).start()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_signal(self, sig: int, group: bool = False) -> None:
        if not self.running():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)

    def stop(self, timeout: float, sig: int | None = signal.SIGTERM) -> None:
        """``sig`` to the whole group (None: it was already told), then SIGKILL to the group after
        ``timeout`` seconds."""
        if self.process is None:
            return
        if sig is not None:
            self.send_signal(sig, group=True)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
        # Whatever is left in its group (helpers) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def _pump(name: str, stream: IO[bytes], out: IO[str]) -> None:
    prefix = f"{name:<12}| "
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        with contextlib.suppress(ValueError, OSError):
            out.write(prefix + line + "\n")
            out.flush()
    stream.close()


def wait_until(check: Any, timeout: float, stop: threading.Event, children: list[Child]) -> bool:
    """Poll ``check`` until true; False when stopped or a child died meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if any(not c.running() for c in children):
            return False
        with contextlib.suppress(Exception):
            if check():
                return True
        stop.wait(0.1)
    return False


def redis_ping(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    finally:
        client.close()


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


@dataclass
class Stack:
    state_dir: Path
    base_env: dict[str, str]
    out: IO[str]
    redis: Child | None = None
    gateway: Child | None = None
    workers: list[Child] = field(default_factory=list)

    def children(self) -> list[Child]:
        return [c for c in (self.redis, self.gateway, *self.workers) if c is not None]

    def stop(self, soft_shutdown_s: float) -> None:
        """Workers first (their running jobs go back to the queue while Redis is up), then the
        gateway, then Redis."""
        for worker in self.workers:
            # Only the worker's main process: Celery's soft shutdown requeues its job and closes
            # the engine host; the group gets SIGKILL if that takes too long.
            worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            worker.stop(soft_shutdown_s + 15, sig=None)
        if self.gateway is not None:
            self.gateway.stop(15)
        if self.redis is not None:
            self.redis.stop(30)


def redis_child(state_dir: Path, env: dict[str, str]) -> tuple[Child, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError("redis-server is not installed: install it, or give --redis-url (KILN_REDIS_URL)")
    data = state_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    pidfile = data / "redis.pid"
    with contextlib.suppress(ValueError, OSError):
        old = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{old}/cmdline").read_bytes()
        if b"redis-server" in cmdline:
            raise ConfigError(f"A redis-server (pid {old}) still uses {data}: stop it first")
    port = free_port()
    args = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data),
        "--pidfile", str(pidfile),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
    ]  # fmt: skip
    return Child("redis", args, env), f"redis://127.0.0.1:{port}/0"


def signing_secret(state_dir: Path) -> str:
    """A download-URL signing secret kept in the state folder (stable across restarts)."""
    path = state_dir / "signing-secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def command_up(args: argparse.Namespace) -> int:
    from api.settings import load_gateway_settings
    from engine.settings import load_settings
    from worker.settings import load_worker_settings

    for name in PER_WORKER:
        if getattr(args, name, None) is not None:
            log.error("kiln up names its workers and assigns GPUs itself: use --gpus instead of --%s",
                      name.replace("_", "-"))  # fmt: skip
            return EXIT_USAGE
    state_dir = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = open(state_dir / "up.lock", "w")  # noqa: SIM115 (held for the life of the command)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.error("Another `kiln up` uses %s", state_dir)
        return EXIT_USAGE

    env = {k: v for k, v in os.environ.items() if k not in ("KILN_WORKER_ID", "KILN_GPU")}
    if args.config is not None:
        env["KILN_CONFIG"] = str(args.config.resolve())
    env.update(flags_as_env(args))
    config = Path(env["KILN_CONFIG"]) if env.get("KILN_CONFIG") else None
    own_redis = not is_given("redis_url", env, config)
    if not is_given("storage_url", env, config):
        env["KILN_STORAGE_URL"] = (state_dir / "storage").as_uri()
    if not is_given("insecure", env, config):
        keys = is_given("api_keys", env, config) or is_given("api_keys_file", env, config)
        env["KILN_INSECURE"] = "false" if keys else "true"
    gateway_env = {k[5:].lower(): v for k, v in env.items() if k.startswith("KILN_")}
    host = gateway_env.get("host") or config_values(config, "gateway").get("host") or "127.0.0.1"
    port = int(gateway_env.get("port") or config_values(config, "gateway").get("port") or 8188)
    if not is_given("public_url", env, config):
        env["KILN_PUBLIC_URL"] = f"http://{url_host(str(host))}:{port}"
    storage_url = env.get("KILN_STORAGE_URL") or ""
    insecure = env.get("KILN_INSECURE") == "true"
    if storage_url.startswith("file:") and not insecure and not is_given("signing_secret", env, config):
        env["KILN_SIGNING_SECRET"] = signing_secret(state_dir)

    stack = Stack(state_dir, env, sys.stderr)
    if own_redis:
        redis, redis_url = redis_child(state_dir, env)
        env["KILN_REDIS_URL"] = redis_url
        stack.redis = redis
    try:
        # Fail before starting anything when a setting is wrong.
        with _environ(env):
            worker_settings = load_worker_settings(config)
            engine_settings = load_settings(config)
            gateway_settings = load_gateway_settings(config)
            if storage_url.startswith("file:"):
                gateway_settings.download_secret()
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE

    if args.gpus == "auto":
        gpus = [] if engine_settings.device in ("cpu", "mps") else detect_gpus(env)
    elif args.gpus in ("none", ""):
        gpus = []
    else:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    hostname = socket.gethostname()
    kiln = [sys.executable, "-m", "kiln"]
    for index, gpu in enumerate(gpus):
        worker_env = {**env, "KILN_WORKER_ID": f"{hostname}-gpu{gpu if gpu.isdigit() else index}"}
        if gpu.isdigit():
            worker_env["KILN_GPU"] = gpu
        else:  # a GPU or MIG UUID: pin it directly
            worker_env.update(CUDA_VISIBLE_DEVICES=gpu, KILN_DEVICE="cuda:0")
        name = f"gpu{gpu if gpu.isdigit() else index}"
        stack.workers.append(Child(f"worker-{name}", [*kiln, "worker"], worker_env))
    if not gpus:
        worker_env = {**env, "KILN_WORKER_ID": f"{hostname}-cpu"}
        if engine_settings.device == "auto":
            worker_env["KILN_DEVICE"] = "cpu"
        stack.workers.append(Child("worker-cpu", [*kiln, "worker"], worker_env))
    stack.gateway = Child("gateway", [*kiln, "serve"], env)

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    public_url = env.get("KILN_PUBLIC_URL", gateway_settings.public_url)
    code = EXIT_OK
    try:
        code = _run(stack, stop, port, host, public_url, insecure)
    finally:
        print("Stopping Kiln ...", file=sys.stderr, flush=True)
        stack.stop(worker_settings.soft_shutdown_timeout_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        lock.close()
    print("Kiln stopped.", file=sys.stderr, flush=True)
    return code


def _run(stack: Stack, stop: threading.Event, port: int, host: str, public_url: str, insecure: bool) -> int:
    if stack.redis is not None:
        stack.redis.start(stack.out)
        redis_url = stack.base_env["KILN_REDIS_URL"]
        if not wait_until(lambda: redis_ping(redis_url), 60, stop, [stack.redis]):
            return EXIT_OK if stop.is_set() else _failed("redis-server did not start")
    assert stack.gateway is not None
    stack.gateway.start(stack.out)
    for worker in stack.workers:
        worker.start(stack.out)
    health = f"http://{url_host(host)}:{port}/healthz"
    if not wait_until(lambda: http_ok(health), 120, stop, stack.children()):
        return EXIT_OK if stop.is_set() else _failed("the gateway did not start")
    mode = "insecure local mode: no API key needed" if insecure else "API keys required"
    devices = ", ".join(w.name for w in stack.workers)
    print(f"Kiln is up: {public_url} ({mode}; workers: {devices})", flush=True)
    while not stop.is_set():
        for child in stack.children():
            if child.running():
                continue
            assert child.process is not None
            if child in stack.workers and _may_restart(child):
                log.warning("%s exited with %s; restarting it", child.name, child.process.returncode)
                child.start(stack.out)
                continue
            return _failed(f"{child.name} exited with {child.process.returncode}")
        stop.wait(0.2)
    return EXIT_OK


def _may_restart(child: Child, limit: int = 5, window_s: float = 300.0) -> bool:
    now = time.monotonic()
    child.restarts = [t for t in child.restarts if now - t < window_s] + [now]
    return len(child.restarts) <= limit


def _failed(message: str) -> int:
    log.error("%s; stopping", message)
    return EXIT_FAILED


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Any:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
