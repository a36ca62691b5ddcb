"""A small vLLM driver for tests and benchmarks: one engine, requests as JSON lines on stdin.

Run with a Python that has vLLM (not promptcache's own venv)::

    python -m promptcache.integrations.vllm_driver --model HF_DIR --store DIR [--log FILE]

Each stdin line ``{"ids": [...], "params": {...} | null, "max_tokens": N}`` is generated alone,
greedily; each answer is one stdout line prefixed ``@@promptcache@@ `` (vLLM logs to stdout too):
``{"token_ids", "text", "num_cached_tokens", "wall_ms"}``; with ``"logprobs": true`` in the line (and
``--max-logprobs -1``) also ``first_logprobs``, the first generated token's log-probabilities over
the whole vocabulary (index = token id), for first-token KL. ``{"reset_prefix_cache": true}``
empties vLLM's prefix cache (answer ``{"reset": bool}``). The first such line is
``{"ready": true}`` once the engine has started. Why a process: vLLM is an optional extra with its
own torch build, and its engine start costs a minute, so a test module shares one.
:class:`DriverProcess` is the client (it imports no vLLM).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

MARK = "@@promptcache@@ "


def _say(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF safetensors folder")
    ap.add_argument("--store", required=True, help="promptcache store (directory or redis://...)")
    ap.add_argument("--log", default=None, help="connector JSON-lines log")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--no-connector", action="store_true", help="plain vLLM (the baseline)")
    ap.add_argument("--prefix-caching", action="store_true", help="vLLM's own prefix caching on (default off)")
    ap.add_argument("--max-logprobs", type=int, default=20, help="vLLM's max_logprobs (-1: whole vocabulary)")
    ap.add_argument("--model-fingerprint", default=None,
                    help="promptcache fingerprint of the model: the connector then checks every key")
    args = ap.parse_args(argv)

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    ktc = None
    if not args.no_connector:
        extra = {"store": args.store}
        if args.log:
            extra["log"] = args.log
        if args.model_fingerprint:
            extra["model_fingerprint"] = args.model_fingerprint
        ktc = KVTransferConfig(kv_connector="PromptCacheConnector",
                               kv_connector_module_path="promptcache.integrations.vllm",
                               kv_role="kv_both", kv_connector_extra_config=extra,
                               kv_load_failure_policy="recompute")
    llm = LLM(model=args.model, dtype=args.dtype, block_size=args.block_size,
              max_model_len=args.max_model_len, enable_prefix_caching=args.prefix_caching,
              kv_transfer_config=ktc, seed=0, max_logprobs=args.max_logprobs)
    _say({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        if job.get("reset_prefix_cache"):
            _say({"reset": bool(llm.reset_prefix_cache())})
            continue
        extra_args = {"kv_transfer_params": job["params"]} if job.get("params") else None
        sp = SamplingParams(temperature=0.0, max_tokens=int(job.get("max_tokens", 16)), extra_args=extra_args,
                            logprobs=-1 if job.get("logprobs") else None)
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": job["ids"]}], sp, use_tqdm=False)[0]
        wall = (time.perf_counter() - t0) * 1000
        comp = out.outputs[0]
        answer = {"token_ids": list(comp.token_ids), "text": comp.text,
                  "num_cached_tokens": out.num_cached_tokens, "wall_ms": round(wall, 3)}
        if job.get("logprobs") and comp.logprobs:
            answer["first_logprobs"] = _dense(comp.logprobs[0])
        _say(answer)
    return 0


def _dense(logprobs: dict) -> list[float]:
    """vLLM's ``{token_id: Logprob}`` of one step as a list indexed by token id (-inf where absent)."""
    out = [float("-inf")] * (max(logprobs) + 1)
    for tid, lp in logprobs.items():
        out[tid] = float(lp.logprob)
    return out


def first_token_kl(ref: list[float], other: list[float]) -> float:
    """KL(ref || other) in nats between two first-token log-probability vectors (``first_logprobs``).
    Why here: the tests and the benchmark compare the connector's answer to vLLM's own prefill."""
    import math

    n = max(len(ref), len(other))
    ref = ref + [float("-inf")] * (n - len(ref))
    other = other + [float("-inf")] * (n - len(other))
    kl = 0.0
    for a, b in zip(ref, other):
        if a == float("-inf"):
            continue
        kl += math.exp(a) * (a - b)
    return kl


class DriverProcess:
    """Client of the driver: starts it with ``python`` (a vLLM venv), one JSON line in, one out.

    ``read``/``ask`` raise ``RuntimeError`` with the driver's last output lines when it dies or
    stays silent past the timeout.
    """

    def __init__(self, python: str | os.PathLike, model: str | os.PathLike, store: str | os.PathLike,
                 log: str | os.PathLike | None = None, *, block_size: int = 32, extra: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        repo = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": str(repo), "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": "1", **(env or {})}
        cmd = [str(python), "-m", "promptcache.integrations.vllm_driver", "--model", str(model),
               "--store", str(store), "--block-size", str(block_size), *(extra or [])]
        if log is not None:
            cmd += ["--log", str(log)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=repo, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.tail: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith(MARK):
                self.lines.put(line[len(MARK):])
            else:
                self.tail = (self.tail + [line])[-60:]
        self.lines.put("")

    def read(self, timeout: float) -> dict:
        """The next answer (the first is ``{"ready": true}``)."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = ""
        if not line:
            raise RuntimeError("vLLM driver gave no answer; its last output:\n" + "".join(self.tail))
        return json.loads(line)

    def send(self, job: dict, timeout: float = 120) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self.read(timeout)

    def ask(self, ids: list[int], params: dict | None, max_tokens: int = 24, timeout: float = 120,
            logprobs: bool = False) -> dict:
        """Greedy generation of ``ids`` with ``kv_transfer_params`` ``params`` (or none)."""
        return self.send({"ids": ids, "params": params, "max_tokens": max_tokens, "logprobs": logprobs}, timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    sys.exit(main())
