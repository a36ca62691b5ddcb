"""A small vLLM driver for tests and benchmarks: one engine, requests as JSON lines on stdin.

Run with a Python that has vLLM (not promptcache's own venv)::

    python -m promptcache.integrations.vllm_driver --model HF_DIR --store DIR [--log FILE]

Each stdin line ``{"ids": [...], "params": {...} | null, "max_tokens": N}`` is generated alone,
greedily; each answer is one stdout line prefixed ``@@promptcache@@ `` (vLLM logs to stdout too):
``{"token_ids", "text", "num_cached_tokens", "wall_ms"}``. The first such line is
``{"ready": true}`` once the engine has started. Why a process: vLLM is an optional extra with its
own torch build, and its engine start costs a minute, so a test module shares one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

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
    args = ap.parse_args(argv)

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    ktc = None
    if not args.no_connector:
        extra = {"store": args.store}
        if args.log:
            extra["log"] = args.log
        ktc = KVTransferConfig(kv_connector="PromptCacheConnector",
                               kv_connector_module_path="promptcache.integrations.vllm",
                               kv_role="kv_both", kv_connector_extra_config=extra)
    llm = LLM(model=args.model, dtype=args.dtype, block_size=args.block_size,
              max_model_len=args.max_model_len, enable_prefix_caching=False,
              kv_transfer_config=ktc, seed=0)
    _say({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        extra_args = {"kv_transfer_params": job["params"]} if job.get("params") else None
        sp = SamplingParams(temperature=0.0, max_tokens=int(job.get("max_tokens", 16)), extra_args=extra_args)
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": job["ids"]}], sp, use_tqdm=False)[0]
        wall = (time.perf_counter() - t0) * 1000
        comp = out.outputs[0]
        _say({"token_ids": list(comp.token_ids), "text": comp.text,
              "num_cached_tokens": out.num_cached_tokens, "wall_ms": round(wall, 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
