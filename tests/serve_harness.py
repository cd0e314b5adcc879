"""Starting and stopping servers for the serving tests, on loopback only and with bounded waits.

``ServerThread`` runs an ASGI app under a real uvicorn in a background thread (fast tests with the fake engine, real
sockets so streaming and disconnects behave as in production). ``ServerProcess`` starts ``nanoflow serve`` / ``chat``
as a subprocess on the real engine and waits for ``/health``.

This module is also a pytest plugin (test modules list it in ``pytest_plugins``): its session-scoped ``real_server``
fixture starts one ``nanoflow serve --device cpu`` for every module that needs it, because loading the model takes
most of the time, and checks at the end of the session that SIGTERM makes it exit 0.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def real_engine_missing() -> str | None:
    """Why the real-engine tests cannot run yet, or None when they can."""
    for module in ("nanoflow.engine.async_engine", "nanoflow.cli"):
        if importlib.util.find_spec(module) is None:
            return f"{module} does not exist yet; real-engine serving tests need it"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(
    url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, path: str = "/health"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(url + path, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}{path} not healthy after {timeout} s")


class ServerThread:
    """``with ServerThread(app) as url:`` serves ``app`` on 127.0.0.1 until the block ends."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


class ServerProcess:
    """A ``python -m <module> <args>`` subprocess (stdout/stderr to a log file) that serves on a free port."""

    def __init__(self, args: list[str], log_path: Path, health_path: str = "/health",
                 module: str = "nanoflow.cli") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [PYTHON, "-m", module, *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = log_path
        self.health_path = health_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 240.0) -> str:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_health(self.url, timeout, self.proc, self.health_path)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"{' '.join(self.cmd)} failed: {e}\n--- log ---\n{self.log()}") from e
        return self.url

    def log(self) -> str:
        """The end of the server's output, progress-bar lines left out."""
        lines = self.log_path.read_text(errors="replace").replace("\r", "\n").splitlines()
        return "\n".join(line for line in lines if "/s]" not in line)[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None


class SharedServer:
    """The session's real server. ``alive()`` checks it still generates before each test that uses it; once it has
    not, every later test fails at once instead of waiting out its own timeouts (a wedged engine would otherwise
    cost minutes per test)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.wedged: str | None = None

    def alive(self) -> str:
        if self.wedged is not None:
            pytest.fail(f"the shared nanoflow serve stopped generating earlier in this session: {self.wedged}")
        body = {"prompt": "Hi", "max_tokens": 1, "temperature": 0, "ignore_eos": True}
        try:
            r = httpx.post(f"{self.url}/v1/completions", json=body, timeout=30)
            problem = None if r.status_code == 200 else f"probe answered {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            problem = f"a 1-token probe request failed: {type(e).__name__}: {e}"
        if problem is not None:
            self.wedged = problem
            pytest.fail(problem)
        return self.url


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServer]:
    """One ``nanoflow serve --device cpu`` (embedded model, default limits) shared by the session."""
    missing = real_engine_missing()
    if missing:
        pytest.skip(missing)
    proc = ServerProcess(["serve", "--device", "cpu"], tmp_path_factory.mktemp("serve") / "server.log")
    shared = SharedServer(proc.start())
    yield shared
    code = proc.stop(timeout=90)
    assert code == 0, f"nanoflow serve did not exit 0 on SIGTERM (got {code})\n{proc.log()}"
