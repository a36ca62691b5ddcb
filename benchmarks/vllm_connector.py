"""TTFT of vLLM cold, vLLM warm (its own prefix cache), and vLLM with PromptCacheConnector.

One vLLM engine (prefix caching on, the connector configured) in a subprocess of the vLLM venv
(promptcache/integrations/vllm_driver.py). Per module size: a schema with one document module of
about N tokens is encoded by ``promptcache encode``; then, on the same rendered prompt, with
``max_tokens=1`` (wall time of one request ~ TTFT), median of ``--repeats``:

- cold: prefix cache emptied, no kv_transfer_params (vLLM computes everything);
- warm: the same request again (vLLM's own prefix-cache hit);
- connector: prefix cache emptied, with the params (the module loaded from the store).

Not covered yet: the modular RAG workload (non-prefix module selections are not supplied by the
connector: docs/vllm.md). Example::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vllm_connector.py --sizes 2000 4000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from promptcache.integrations.vllm import KeyContext, render, supplied_tokens  # noqa: E402
from promptcache.integrations.vllm_driver import DriverProcess  # noqa: E402
from promptcache.loading import converted_dir, load_model  # noqa: E402

DEFAULT_VENV_PY = Path.home() / ".cache/promptcache/vllm-venv/bin/python"


def schema_of(tokens: int, tokenizer) -> str:
    """A schema with one document module of about ``tokens`` tokens (the example document, repeated)."""
    para = (REPO / "examples/document_qa.txt").read_text()
    per = len(tokenizer(para)["input_ids"])
    doc = para * max(1, round(tokens / per))
    return (f'<schema name="doc{tokens}"><system>Answer from the document.<module name="doc">{doc}</module>'
            f'</system><user><module name="q"><parameter name="q" length="30"/></module></user></schema>')


def encode(schema_file: Path, store: Path, threads: int) -> None:
    out = subprocess.run([sys.executable, "-m", "promptcache", "encode", str(schema_file), "--store", str(store),
                          "--model", "smollm2", "--device", "cpu", "--threads", str(threads), "--json"],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(f"promptcache encode failed: {out.stderr[-2000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000], help="module sizes in tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vllm-python", default=os.environ.get("PROMPTCACHE_VLLM_PYTHON", str(DEFAULT_VENV_PY)))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM python at {args.vllm_python} (see docs/vllm.md)")
    model, tok = load_model("smollm2", device="cpu")
    keys = KeyContext.from_model(model, tok)
    work = Path(tempfile.mkdtemp(prefix="pc-vllm-bench-"))
    store = work / "store"
    prompts = []
    for n in args.sizes:
        schema = schema_of(n, tok)
        (work / f"doc{n}.xml").write_text(schema)
        encode(work / f"doc{n}.xml", store, args.threads)
        ids, params = render(f'<prompt schema="doc{n}"><doc/><q q="What is the document about?"/></prompt>',
                             schema, keys=keys, store=str(store))
        prompts.append((n, ids, params))
    del model
    drv = DriverProcess(args.vllm_python, converted_dir("smollm2"), store, work / "connector.log",
                        extra=["--prefix-caching", "--max-model-len", "8192"],
                        env={"OMP_NUM_THREADS": str(args.threads)})
    rows = []
    try:
        drv.read(600)
        for n, ids, params in prompts:
            t = {"cold": [], "warm": [], "connector": []}
            cached = {}
            for _ in range(args.repeats):
                drv.send({"reset_prefix_cache": True})
                t["cold"].append(drv.ask(ids, None, max_tokens=1, timeout=600)["wall_ms"])
                warm = drv.ask(ids, None, max_tokens=1, timeout=600)
                t["warm"].append(warm["wall_ms"])
                drv.send({"reset_prefix_cache": True})
                conn = drv.ask(ids, params, max_tokens=1, timeout=600)
                t["connector"].append(conn["wall_ms"])
                cached = {"warm": warm["num_cached_tokens"], "connector": conn["num_cached_tokens"]}
            row = {"module_tokens": n, "prompt_tokens": len(ids), "supplied": supplied_tokens(params),
                   **{f"{k}_ms": round(statistics.median(v), 1) for k, v in t.items()},
                   **{f"{k}_cached": v for k, v in cached.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        drv.close()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
