"""TTFT of vLLM cold, vLLM warm (its own prefix cache), and vLLM with PromptCacheConnector.

One vLLM engine (prefix caching on, the connector configured) in a subprocess of the vLLM venv
(promptcache/integrations/vllm_driver.py). Per module size: a schema with one document module of
about N tokens is encoded by ``promptcache encode``; then, on the same rendered prompt, with
``max_tokens=1`` (wall time of one request ~ TTFT), median of ``--repeats``:

- cold: prefix cache emptied, no kv_transfer_params (vLLM computes everything);
- warm: the same request again (vLLM's own prefix-cache hit);
- connector: prefix cache emptied, with the params (the module loaded from the store). The first
  repeat reads the entry from the store (``connector_first_ms``: a cold host cache); later repeats
  copy it from the connector's host LRU (``connector_ms``, median; docs/vllm.md "host cache").

Modular RAG (the serving benchmark's workload, benchmarks/serve_workloads.py): ``--rag-passages``
hotpotqa passages, one ``independent``-encoded module each (``promptcache encode``); each of
``--rag-requests`` requests picks ``--rag-pick`` of them (seeded) plus a question, rendered with
``approximate=True`` (non-prefix selections: every cached passage supplied, re-rotated). Per
request, max_tokens=1: ``vllm_ms`` with vLLM's prefix cache holding every earlier request (what a
running vLLM server has; it serves the shared system text and any common leading passages),
``cold_ms`` (prefix cache emptied), ``connector_ms`` (prefix cache emptied, params; passages seen
by earlier requests come from the host LRU); then, untimed, first-token KL of the connector's
answer to vLLM's own prefill and whether the greedy answers (``--answer-tokens``) are identical.
Target: connector at least 5x below cold. Example::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vllm_connector.py --sizes 2000 4000 8000 --threads 1
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
from promptcache.integrations.vllm_driver import DriverProcess, first_token_kl  # noqa: E402
from promptcache.loading import converted_dir, load_model  # noqa: E402

DEFAULT_VENV_PY = Path.home() / ".cache/promptcache/vllm-venv/bin/python"


def schema_of(tokens: int, tokenizer) -> str:
    """A schema with one document module of about ``tokens`` tokens (the example document, repeated)."""
    para = (REPO / "examples/document_qa.txt").read_text()
    per = len(tokenizer(para)["input_ids"])
    doc = para * max(1, round(tokens / per))
    return (f'<schema name="doc{tokens}"><system>Answer from the document.<module name="doc">{doc}</module>'
            f'</system><user><module name="q"><parameter name="q" length="30"/></module></user></schema>')


def encode(schema_file: Path, store: Path, threads: int, encoding: str = "scaffold") -> None:
    out = subprocess.run([sys.executable, "-m", "promptcache", "encode", str(schema_file), "--store", str(store),
                          "--model", "smollm2", "--device", "cpu", "--threads", str(threads), "--json",
                          "--encoding", encoding],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(f"promptcache encode failed: {out.stderr[-2000:]}")


def rag_prompts(tok, args, work: Path, store: Path, keys) -> tuple[list[tuple[list[int], dict]], int]:
    """The RAG schema encoded independently into ``store``; the requests rendered (approximate)."""
    from benchmarks.serve_workloads import rag_passages, rag_questions, rag_requests, rag_schema

    pool = rag_passages(tok, args.rag_passages, args.rag_passage_tokens)
    schema = rag_schema(pool)
    (work / "rag.xml").write_text(schema, encoding="utf-8")
    encode(work / "rag.xml", store, args.threads, "independent")
    reqs = rag_requests(pool, rag_questions(), args.rag_requests, args.rag_pick, 0, "vllm-connector")
    return [render(r.ours, schema, keys=keys, store=str(store), approximate=True) for r in reqs], len(pool)


def run_rag(drv: DriverProcess, prompts: list[tuple[list[int], dict]], log: Path, answer_tokens: int) -> dict:
    """Per request TTFT three ways, then KL and identical answers (see the module docstring)."""
    rows = [{"prompt_tokens": len(ids), "supplied": supplied_tokens(params)} for ids, params in prompts]
    drv.send({"reset_prefix_cache": True})
    for row, (ids, _) in zip(rows, prompts):
        out = drv.ask(ids, None, max_tokens=1, timeout=600)
        row.update(vllm_ms=out["wall_ms"], vllm_cached=out["num_cached_tokens"])
    for row, (ids, _) in zip(rows, prompts):
        drv.send({"reset_prefix_cache": True})
        row["cold_ms"] = drv.ask(ids, None, max_tokens=1, timeout=600)["wall_ms"]
    for row, (ids, params) in zip(rows, prompts):
        drv.send({"reset_prefix_cache": True})
        before = len(_log(log))
        out = drv.ask(ids, params, max_tokens=1, timeout=600)
        loaded = [r for r in _log(log)[before:] if r["event"] == "loaded"]
        row.update(connector_ms=out["wall_ms"], connector_cached=out["num_cached_tokens"],
                   host_hits=sum(r.get("host_hits", 0) for r in loaded))
    for row, (ids, params) in zip(rows, prompts):
        drv.send({"reset_prefix_cache": True})
        ref = drv.ask(ids, None, max_tokens=answer_tokens, timeout=600, logprobs=True)
        drv.send({"reset_prefix_cache": True})
        got = drv.ask(ids, params, max_tokens=answer_tokens, timeout=600, logprobs=True)
        row.update(kl=first_token_kl(ref["first_logprobs"], got["first_logprobs"]),
                   identical=got["token_ids"] == ref["token_ids"])
    med = {k: round(statistics.median(r[k] for r in rows), 1) for k in ("vllm_ms", "cold_ms", "connector_ms")}
    return {"workload": "rag", "requests": len(rows), **{f"{k}_median": v for k, v in med.items()},
            "cold_over_connector": round(med["cold_ms"] / med["connector_ms"], 2),
            "vllm_over_connector": round(med["vllm_ms"] / med["connector_ms"], 2),
            "mean_prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in rows), 1),
            "mean_supplied": round(statistics.mean(r["connector_cached"] for r in rows), 1),
            "mean_vllm_cached": round(statistics.mean(r["vllm_cached"] for r in rows), 1),
            "kl_mean": round(statistics.mean(r["kl"] for r in rows), 5), "kl_max": round(max(r["kl"] for r in rows), 5),
            "identical": f"{sum(r['identical'] for r in rows)}/{len(rows)}", "rows": rows}


def _log(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000], help="module sizes in tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vllm-python", default=os.environ.get("PROMPTCACHE_VLLM_PYTHON", str(DEFAULT_VENV_PY)))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--rag-requests", type=int, default=8, help="modular RAG requests (0: none)")
    ap.add_argument("--rag-passages", type=int, default=20)
    ap.add_argument("--rag-passage-tokens", type=int, default=200)
    ap.add_argument("--rag-pick", type=int, default=4)
    ap.add_argument("--answer-tokens", type=int, default=24, help="greedy answer length for identical answers")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}", flush=True)
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
    rag = rag_prompts(tok, args, work, store, KeyContext.from_model(model, tok, "independent"))[0] \
        if args.rag_requests else []
    del model
    log = work / "connector.log"
    max_len = max([len(ids) for _, ids, _ in prompts] + [len(ids) for ids, _ in rag] + [1024]) + 64
    drv = DriverProcess(args.vllm_python, converted_dir("smollm2"), store, log,
                        extra=["--prefix-caching", "--max-model-len", str(max_len), "--max-logprobs", "-1"],
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
            first = t["connector"][0]
            hits = t["connector"][1:] or t["connector"]
            row = {"module_tokens": n, "prompt_tokens": len(ids), "supplied": supplied_tokens(params),
                   "cold_ms": round(statistics.median(t["cold"]), 1), "warm_ms": round(statistics.median(t["warm"]), 1),
                   "connector_first_ms": round(first, 1), "connector_ms": round(statistics.median(hits), 1),
                   **{f"{k}_cached": v for k, v in cached.items()}}
            row["connector_over_warm"] = round(row["connector_ms"] / row["warm_ms"], 2)
            row["cold_over_connector"] = round(row["cold_ms"] / row["connector_ms"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if rag:
            rows.append(run_rag(drv, rag, log, args.answer_tokens))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "rows"}), flush=True)
    finally:
        drv.close()
    print(f"load average {os.getloadavg()}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
