"""A throw-away ``redis-server`` for the store tests: loopback, free port, temp dir, no persistence.

Import the fixtures into a test module (``from redis_fixture import redis_server, redis_url``).
Tests that need Redis are skipped, with the reason, only when the ``redis-server`` binary is not
installed; a server that is installed but fails to start is an error, not a skip.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_BIN = shutil.which("redis-server")
SKIP_REASON = "redis-server binary not found (apt-get install redis-server)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """Start/stop one redis-server process; ``url`` stays the same across restarts."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        import redis
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}): "
                                   + (self.workdir / "redis.log").read_text()[-2000:])
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _start(workdir: Path) -> RedisServer:
    if REDIS_BIN is None:
        pytest.skip(SKIP_REASON)
    last: Exception | None = None
    for _ in range(3):  # a free port can be taken between probing and binding
        try:
            return RedisServer(workdir).start()
        except RuntimeError as exc:
            last = exc
    raise last  # type: ignore[misc]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """URL of a redis-server shared by the session (tests isolate themselves by key prefix)."""
    server = _start(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path):
    """A private redis-server a test may stop and restart."""
    server = _start(tmp_path / "redis")
    yield server
    server.stop()
