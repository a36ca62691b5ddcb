#!/usr/bin/env python
"""Time to first token against prompt length, five ways side by side in ONE run.

(a) baseline: full prefill of the prompt's tokens;
(b) transformers prefix reuse: a DynamicCache of the document, computed once and deep-copied per
    request (what a user does without this toolkit), then the question's forward;
(c) promptcache, scaffold encoding; (d) promptcache, independent encoding;
(e) floor: the question's forward alone on an already-assembled cache (nothing else timed).

Each case is a cached document module of N tokens plus a ~30-token question in the same user turn,
and a persona-style case (six unions of three members, a ~1.1k-token prompt selecting a non-scaffold
member of each, a one-line question). Medians of --repeats runs;
prints a table of medians and ratios, writes CSV and a PNG plot.

    python benchmarks/ttft.py                                   # default model, CPU, float32
    python benchmarks/ttft.py --lengths 512,1024 --repeats 3
    python benchmarks/ttft.py --random-weights llama-7b --device cuda   # latency only, random weights
    python benchmarks/ttft.py --fastpath --lengths 1024 --threads 1     # issue 17: bf16, compiled, peers

Fast path (``--fastpath``, or ``--variants``/``--peers``): beside the five columns above (the model as
loaded, fp32 eager on CPU by default), each extra *variant* (a dtype, eager or compiled) times its
own baseline prefill (a) and scaffold cached TTFT (c) on the same prompts in the same interleaved
loop, and each *peer* times its full prefill and its prefix-cached request on the same token ids:

- ``llamacpp``: llama.cpp (``llama-cpp-python``, when importable) on the GGUF the bundled model was
  converted from, the prompt's prefix (everything before our computed suffix) kept in its KV;
- ``vllm``: vLLM's CPU build in its own venv (``--vllm-venv``, default
  ``~/.cache/promptcache/vllm-venv``, see benchmarks/serve_servers.py), prefix caching on, warmed with
  the same prefix, so it computes the suffix plus the part of the prefix that does not fill a block
  (the JSON says how many tokens it reused); its times are ``LLM.generate`` with one new token.

A compiled variant is warmed up explicitly (``pc.warmup()``, per case: its cache and suffix buckets)
before any timing; the warm-up time is reported on its own line and in the CSV/JSON
(``<variant>_warmup_s``), never inside a TTFT, and the engine's ``compile_report()`` (recompiles,
eager fallbacks and why) goes into the JSON. Only the cached path is compiled: a compiled variant's
baseline (a) is its eager full prefill. The ratios table compares every
variant's cached TTFT with the first column's (issue 17's target: the compiled bf16 persona case
at most 0.5x of fp32 eager) and with the peers' prefix-cached TTFT (target: below), and the
variant's full-prefill baseline with vLLM's prefill (target: within 1.3x); baseline speedups a/c are
within one variant, so in one dtype.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):  # run as a file: the repository root replaces benchmarks/ on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import (ROOT, doc_case, persona_case, print_table, set_threads,  # noqa: E402
                               sync, write_csv)
from promptcache import PromptCache, load_model  # noqa: E402

RANDOM_CONFIGS = {  # vocab_size: at least this (the tokenizer's size when larger)
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, max_position_embeddings=40960, vocab_size=32000),
    # SmolLM2-135M's shape (the default model), for machines without its GGUF (the GPU check).
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=40960, rope_theta=100000.0,
                    tie_word_embeddings=True, vocab_size=49152),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, max_position_embeddings=16384),
    # For tests and dry runs: a forward takes milliseconds.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=40960),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FASTPATH_VARIANTS = "bf16,bf16+compile"


@dataclass(frozen=True)
class Variant:
    """An extra engine column: a dtype, eager or compiled (``bf16+compile``)."""

    key: str            # column prefix in the CSV/JSON, e.g. "bf16c"
    label: str          # e.g. "bf16 compiled"
    dtype: torch.dtype
    compile: bool


def parse_variants(text: str) -> list[Variant]:
    """``"bf16,bf16+compile"`` -> variants; an unknown dtype or flag is an argparse error naming it."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item or item == "none":
            continue
        name, _, flag = item.partition("+")
        if name not in DTYPES or flag not in ("", "compile"):
            raise argparse.ArgumentTypeError(f"bad variant {item!r}: expected DTYPE or DTYPE+compile with DTYPE "
                                             f"one of {', '.join(DTYPES)}")
        compiled = flag == "compile"
        out.append(Variant(name + ("c" if compiled else ""), name + (" compiled" if compiled else " eager"),
                           DTYPES[name], compiled))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--random-weights", default=None,
                   help=f"a preset ({', '.join(RANDOM_CONFIGS)}) or a JSON file of LlamaConfig fields: random "
                        "weights of that shape with the --model tokenizer (latency does not depend on weights)")
    p.add_argument("--tokenizer", default=None,
                   help="with --random-weights: 'char' (the tests' character-level ChatML tokenizer, always "
                        "available) or a folder with a tokenizer; the --model weights are then never loaded")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the first (five-way) column (default: float32 on CPU)")
    p.add_argument("--placement", default="device", choices=["device", "host"],
                   help="where module caches live between requests (host: copied to the device per request)")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192", help="document lengths in tokens")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    p.add_argument("--no-persona", action="store_true", help="skip the persona case")
    p.add_argument("--only", default=None, choices=["scaffold"],
                   help="'scaffold': time only (a) and (c) of the first column (no independent encoding, "
                        "DynamicCache copy or floor): shorter runs for long prompts on big models")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a busy machine); also "
                        "the peers' threads")
    p.add_argument("--compile", action="store_true",
                   help="the first column's engines compiled too (PromptCache(compile=True), warmed up per case)")
    p.add_argument("--variants", type=parse_variants, default=[],
                   help="extra engine columns, comma list of DTYPE or DTYPE+compile (fp32, bf16, fp16), e.g. "
                        f"{FASTPATH_VARIANTS}")
    p.add_argument("--peers", default="none",
                   help="comma list of llamacpp, vllm; 'auto' = those available (llama_cpp importable, the vLLM "
                        "venv present); 'none' (default)")
    p.add_argument("--fastpath", action="store_true",
                   help=f"shorthand for --variants {FASTPATH_VARIANTS} --peers auto (issue 17's comparison)")
    p.add_argument("--llamacpp-gguf", default=None, help="GGUF for the llama.cpp peer (default: the bundled "
                                                         "model's own GGUF)")
    p.add_argument("--vllm-venv", default=None, help="vLLM venv (default: ~/.cache/promptcache/vllm-venv)")
    p.add_argument("--vllm-dtype", default="bfloat16", help="vLLM weights dtype (default bfloat16: its CPU default)")
    p.add_argument("--out", default=str(ROOT / "results" / "ttft"), help="output prefix for .csv/.png/.json")
    args = p.parse_args(argv)
    if args.fastpath:
        args.variants = args.variants or parse_variants(FASTPATH_VARIANTS)
        args.peers = "auto" if args.peers == "none" else args.peers
    return args


def load_tokenizer(spec: str):
    """``char``: the tests' in-memory character tokenizer (no files needed); else a tokenizer folder."""
    if spec == "char":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_tokenizer import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def build_model(args):
    """The --model (weights and tokenizer), or random weights of a preset shape with its tokenizer."""
    tokenizer_only = getattr(args, "tokenizer", None)
    if tokenizer_only and not args.random_weights:
        raise SystemExit("--tokenizer needs --random-weights (it replaces the --model tokenizer)")
    if tokenizer_only:
        from promptcache.loading import check_device, default_dtype

        tokenizer, device = load_tokenizer(tokenizer_only), check_device(args.device)
        dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    else:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        dtype, device = model.dtype, model.device
        if not args.random_weights:
            return model, tokenizer
        del model
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(RANDOM_CONFIGS[args.random_weights] if args.random_weights in RANDOM_CONFIGS
                  else json.loads(Path(args.random_weights).read_text()))
    fields["vocab_size"] = max(len(tokenizer), fields.get("vocab_size", 0))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**fields)).to(dtype).eval()
    return model, tokenizer


# ---------------------------------------------------------------- engine variants


def engine_supports(name: str) -> bool:
    """Whether this checkout's ``PromptCache`` takes keyword ``name`` (the fast path lands separately)."""
    return name in inspect.signature(PromptCache.__init__).parameters


def build_variant(model, tokenizer, variant: Variant, placement: str) -> tuple[PromptCache | None, dict]:
    """The variant's engine on its own copy of the weights, warmed up when compiled; (None, why) if unsupported.

    A copy per variant: compiled copies must not share a module with the eager ones (issue 17: they
    share dynamo's wrapper and its recompile limit)."""
    info: dict = {"variant": variant.label}
    if variant.compile and not engine_supports("compile"):
        info["skipped"] = "PromptCache has no compile= in this checkout"
        return None, info
    copy_ = copy.deepcopy(model).to(variant.dtype).eval()
    kwargs = {"compile": True} if variant.compile else {}
    return PromptCache(copy_, tokenizer, encoding="scaffold", placement=placement, progress=False, **kwargs), info


def warm_up(pc: PromptCache, n_suffix: int) -> tuple[float, object]:
    """Explicit warm-up of a compiled engine for the case just added (its cache and suffix buckets):
    (seconds, the engine's report). Timed here so that no TTFT includes a compile."""
    t0 = time.perf_counter()
    report = pc.warmup(suffix_lengths=[n_suffix, 1])
    return time.perf_counter() - t0, report


def _jsonable(obj):
    """A report object as JSON-friendly data (dataclass, dict or its repr)."""
    import dataclasses

    if obj is None or isinstance(obj, (int, float, str, bool)):
        return obj
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return repr(obj)


# ---------------------------------------------------------------- peers


class VllmPeer:
    """vLLM's CPU build through promptcache's driver process (its own venv): full prefill from an empty
    prefix cache, and the same prompt after a request for its prefix (vLLM's prefix-cache hit)."""

    name = "vLLM"

    def __init__(self, python: Path, folder: str, threads: int, dtype: str, max_model_len: int) -> None:
        from promptcache.integrations.vllm_driver import DriverProcess

        self.work = Path(tempfile.mkdtemp(prefix="pc-ttft-vllm-"))
        extra = ["--no-connector", "--prefix-caching", "--dtype", dtype, "--max-model-len", str(max_model_len)]
        self.driver = DriverProcess(python, folder, self.work / "store", extra=extra,
                                    env={"OMP_NUM_THREADS": str(threads)})
        self.driver.read(900)  # engine start: about a minute
        self.dtype = dtype
        self.prefix: list[int] = []
        self.ids: list[int] = []
        self.last: dict = {}

    def prepare(self, prefix: list[int], suffix: list[int]) -> None:
        self.prefix, self.ids = list(prefix), list(prefix) + list(suffix)

    def cached_s(self) -> float:
        self.driver.send({"reset_prefix_cache": True})
        self.driver.ask(self.prefix, None, max_tokens=1, timeout=600)
        self.last = self.driver.ask(self.ids, None, max_tokens=1, timeout=600)
        return self.last["wall_ms"] / 1000

    def prefill_s(self) -> float:
        self.driver.send({"reset_prefix_cache": True})
        return self.driver.ask(self.ids, None, max_tokens=1, timeout=600)["wall_ms"] / 1000

    def first_token(self) -> int:
        return int(self.last["token_ids"][0])

    def info(self) -> dict:
        return {"cached_tokens": self.last.get("num_cached_tokens"), "dtype": self.dtype}

    def close(self) -> None:
        self.driver.close()


def vllm_python(venv: str | None) -> Path | None:
    """The vLLM venv's python when it exists (no probe import here: the driver's start reports failures)."""
    from benchmarks.serve_servers import default_vllm_venv

    python = (Path(venv) if venv else default_vllm_venv()) / "bin" / "python"
    return python if python.exists() else None


def build_peers(args, max_prompt_tokens: int) -> tuple[dict, dict]:
    """Peers asked for by ``--peers`` (``auto``: the available ones); (peers, why each missing one is missing)."""
    from benchmarks import llamacpp

    wanted = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none"]
    auto = wanted == ["auto"]
    if auto:
        wanted = ["llamacpp", "vllm"]
    peers, missing = {}, {}
    threads = args.threads or 1
    for name in wanted:
        if name not in ("llamacpp", "vllm"):
            raise SystemExit(f"--peers: unknown peer {name!r} (llamacpp, vllm, auto, none)")
        if args.random_weights:
            missing[name] = "random weights: a peer would run other weights"
        elif name == "llamacpp":
            gguf = Path(args.llamacpp_gguf) if args.llamacpp_gguf else llamacpp.gguf_for(args.model)
            if not llamacpp.available():
                missing[name] = f"llama_cpp not importable (build: {llamacpp.BUILD_HINT})"
            elif gguf is None:
                missing[name] = f"no GGUF known for {args.model!r}: pass --llamacpp-gguf"
            else:
                peers[name] = llamacpp.LlamaCppPeer(gguf, n_ctx=max_prompt_tokens + 64, threads=threads)
        else:
            from benchmarks.serve_servers import model_folder

            python = vllm_python(args.vllm_venv)
            if python is None:
                missing[name] = "no vLLM venv (benchmarks/serve.py --build-vllm builds it)"
            else:
                print(f"starting vLLM ({args.vllm_dtype}) from {python} ...", flush=True)
                peers[name] = VllmPeer(python, model_folder(args.model), threads, args.vllm_dtype,
                                       max_model_len=max_prompt_tokens + 64)
    for name, why in missing.items():
        print(f"peer {name}: skipped ({why})", flush=True)
        if not auto:
            raise SystemExit(f"--peers {name}: {why}")
    return peers, missing


# ---------------------------------------------------------------- measurement


@torch.inference_mode()
def measure(pcs: dict[str, PromptCache], schema: str, prompt: str, repeats: int,
            variants: dict[str, PromptCache] | None = None, peers: dict | None = None,
            only_scaffold: bool = False) -> dict:
    variants, peers = variants or {}, peers or {}
    scaffold, independent = pcs["scaffold"], pcs.get("independent")
    engines = {k: pc for k, pc in pcs.items()} | {f"var:{k}": pc for k, pc in variants.items()}
    enc = {k: pc.add_schema(schema) for k, pc in engines.items()}
    model, device = scaffold.model, scaffold.device
    name = enc["scaffold"].schema
    # (b), (e) and the peers on the same tokens: prefix = everything before the computed suffix.
    state, request = scaffold.request(prompt)
    ids = scaffold.prompt_ids(state, request)
    n_suffix = len(request.computed_ids)
    prefix, suffix = ids[:-n_suffix], ids[-n_suffix:]
    row = {"case": name}
    for key, pc in engines.items():
        key = key.removeprefix("var:")
        if hasattr(pc, "compile_report") and pc.compile_report().get("enabled"):
            seconds, _ = warm_up(pc, n_suffix)
            row[f"{key}_warmup_s"] = seconds
            print(f"  {name}: {key} warm-up {seconds:.1f} s (not part of any TTFT)", flush=True)
    for pc in [scaffold, *variants.values()]:
        pc.generate(prompt, max_new_tokens=1)  # warm-up: first-call costs stay out of the timings
        pc.generate(prompt, max_new_tokens=1, use_cache=False)
    res = scaffold.generate(prompt, max_new_tokens=1)
    row.update({"prompt_tokens": res.prompt_tokens, "cached_tokens": res.cached_tokens,
                "computed_tokens": res.computed_tokens, "encode_ms_scaffold": enc["scaffold"].encode_s * 1000,
                "encode_ms_independent": enc["independent"].encode_s * 1000 if "independent" in enc else float("nan")})
    ref_token = res.token_ids[0]
    timers: dict[str, Callable[[], float]] = {
        "a_baseline_ms": lambda: scaffold.generate(prompt, 1, use_cache=False).ttft_s,
        "c_scaffold_ms": lambda: scaffold.generate(prompt, 1).ttft_s}
    if not only_scaffold:
        timers |= reference_timers(model, device, prefix, suffix, independent, prompt)
    for key, pc in variants.items():
        timers[f"{key}_a_ms"] = lambda pc=pc: pc.generate(prompt, 1, use_cache=False).ttft_s
        timers[f"{key}_c_ms"] = lambda pc=pc: pc.generate(prompt, 1).ttft_s
        row[f"{key}_top_as_ref"] = pc.generate(prompt, 1).token_ids[0] == ref_token
    for key, peer in peers.items():
        peer.prepare(prefix, suffix)
        timers[f"{key}_a_ms"] = peer.prefill_s
        timers[f"{key}_c_ms"] = peer.cached_s

    # Interleaved: every repeat runs every timer once, so machine noise hits them alike.
    samples: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(repeats):
        for key, fn in timers.items():
            samples[key].append(fn() * 1000)
    row.update({k: statistics.median(v) for k, v in samples.items()})
    # minima too: on a loaded machine noise only adds time, so min is the steadier estimate
    row.update({k.removesuffix("_ms") + "_min_ms": min(v) for k, v in samples.items()})
    for key, peer in peers.items():
        row[f"{key}_top_as_ref"] = peer.first_token() == ref_token
        row[f"{key}_cached_tokens"] = peer.info().get("cached_tokens")
    row["speedup_a_over_c"] = row["a_baseline_ms"] / row["c_scaffold_ms"]
    if not only_scaffold:
        row["c_over_floor"] = row["c_scaffold_ms"] / row["e_floor_ms"]
        row["b_over_c"] = row["b_prefix_reuse_ms"] / row["c_scaffold_ms"]
    for pc in engines.values():
        pc.remove_schema(name)
    return row


def reference_timers(model, device, prefix: list[int], suffix: list[int], independent: PromptCache | None,
                     prompt: str) -> dict[str, Callable[[], float]]:
    """(b) DynamicCache prefix reuse, (d) independent encoding and (e) the floor, on the first column's model."""
    from transformers import DynamicCache

    n = len(prefix) + len(suffix)
    prefix_cache = DynamicCache()
    model(input_ids=torch.tensor([prefix], device=device), past_key_values=prefix_cache, use_cache=True,
          logits_to_keep=1)
    suffix_ids = torch.tensor([suffix], device=device)
    suffix_pos = torch.arange(len(prefix), n, device=device)[None]
    mask = torch.ones(1, n, dtype=torch.long, device=device)

    def prefix_reuse() -> float:
        sync(device)
        t0 = time.perf_counter()
        cache = copy.deepcopy(prefix_cache)
        model(input_ids=suffix_ids, position_ids=suffix_pos, attention_mask=mask, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        sync(device)
        return time.perf_counter() - t0

    layers = [(layer.keys, layer.values) for layer in prefix_cache.layers]

    def floor() -> float:
        cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers])
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=suffix_ids, position_ids=suffix_pos, attention_mask=mask, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        sync(device)
        return time.perf_counter() - t0

    return {"b_prefix_reuse_ms": prefix_reuse,
            "d_independent_ms": lambda: independent.generate(prompt, 1).ttft_s,
            "e_floor_ms": floor}


TTFT_COLUMNS = [("case", "case", "{}"), ("prompt", "prompt_tokens", "{}"), ("computed", "computed_tokens", "{}"),
                ("(a) base ms", "a_baseline_ms", "{:.1f}"), ("(b) prefix ms", "b_prefix_reuse_ms", "{:.1f}"),
                ("(c) scaffold ms", "c_scaffold_ms", "{:.1f}"), ("(d) indep ms", "d_independent_ms", "{:.1f}"),
                ("(e) floor ms", "e_floor_ms", "{:.1f}"), ("a/c", "speedup_a_over_c", "{:.1f}x"),
                ("c/e", "c_over_floor", "{:.2f}"), ("b/c", "b_over_c", "{:.2f}")]
SCAFFOLD_COLUMNS = [c for c in TTFT_COLUMNS if c[1] in ("case", "prompt_tokens", "computed_tokens", "a_baseline_ms",
                                                        "c_scaffold_ms", "speedup_a_over_c")]
PEER_LABELS = {"llamacpp": "llama.cpp (prefix kept in its KV)", "vllm": "vLLM CPU (prefix cache warm)"}


def ratio_rows(rows: list[dict], first_label: str, variants: list[Variant], peers: list[str],
               stat: str = "median") -> list[dict]:
    """One row per (case, engine column): TTFTs, a/c in that column's dtype, and c or a against the others.

    ``c/first`` is against the first column's cached TTFT; ``c/<peer>`` against the peer's prefix-cached
    TTFT; ``a/vllm a`` the full-prefill baseline against vLLM's full prefill. ``stat``: ``median`` or ``min``
    of the repeats."""
    def k(name: str) -> str:
        return name if stat == "median" else name.removesuffix("_ms") + "_min_ms"

    out = []
    for r in rows:
        columns = [(first_label, "a_baseline_ms", "c_scaffold_ms")]
        columns += [(v.label, f"{v.key}_a_ms", f"{v.key}_c_ms") for v in variants if f"{v.key}_c_ms" in r]
        columns += [(PEER_LABELS[p], f"{p}_a_ms", f"{p}_c_ms") for p in peers]
        first_c = r[k("c_scaffold_ms")]
        for label, a, c in columns:
            a_ms, c_ms = r[k(a)], r[k(c)]
            o = {"case": r["case"], "column": label, "stat": stat, "a_ms": a_ms, "c_ms": c_ms,
                 "a_over_c": a_ms / c_ms, "c_over_first": c_ms / first_c}
            for p in peers:
                o[f"c_over_{p}"] = c_ms / r[k(f"{p}_c_ms")]
                if p == "vllm":
                    o["a_over_vllm_a"] = a_ms / r[k("vllm_a_ms")]
            out.append(o)
    return out


def ratio_columns(peers: list[str]) -> list[tuple[str, str, str]]:
    cols = [("case", "case", "{}"), ("column", "column", "{}"), ("(a) base ms", "a_ms", "{:.1f}"),
            ("(c) cached ms", "c_ms", "{:.1f}"), ("a/c", "a_over_c", "{:.1f}x"),
            ("c/first c", "c_over_first", "{:.2f}")]
    cols += [(f"c/{p} c", f"c_over_{p}", "{:.2f}") for p in peers]
    if "vllm" in peers:
        cols.append(("a/vllm a", "a_over_vllm_a", "{:.2f}"))
    return cols


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [r for r in rows if r["case"].startswith("doc")]
    if not docs:  # only the persona case: nothing to plot against length
        return
    x = [r["prompt_tokens"] for r in docs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in [("a_baseline_ms", "(a) baseline prefill"), ("b_prefix_reuse_ms", "(b) DynamicCache copy"),
                       ("c_scaffold_ms", "(c) promptcache scaffold"), ("d_independent_ms", "(d) promptcache independent"),
                       ("e_floor_ms", "(e) floor: suffix forward")]:
        if key in docs[0]:
            ax.plot(x, [r[key] for r in docs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (ms, median)")
    ax.set_title("Time to first token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def compile_report(pc: PromptCache) -> dict | None:
    """The compiled engine's own report (recompiles, buckets), when this checkout has one."""
    return _jsonable(pc.compile_report()) if hasattr(pc, "compile_report") else None


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    model, tokenizer = build_model(args)
    encodings = ("scaffold",) if args.only == "scaffold" else ("scaffold", "independent")
    if args.compile and not engine_supports("compile"):
        raise SystemExit("--compile: this checkout's PromptCache has no compile= argument")
    kwargs = {"compile": True} if args.compile else {}
    pcs = {enc: PromptCache(model, tokenizer, encoding=enc, placement=args.placement, progress=False, **kwargs)
           for enc in encodings}
    first_label = f"{str(model.dtype).removeprefix('torch.')} {'compiled' if args.compile else 'eager'}"
    load = os.getloadavg()
    print(f"model {args.model}{' (random weights: ' + args.random_weights + ')' if args.random_weights else ''} "
          f"on {model.device}, {model.dtype}, placement {args.placement}, torch threads {torch.get_num_threads()}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    cases = [doc_case(tokenizer, int(n)) for n in args.lengths.split(",") if n]
    if not args.no_persona:
        cases.append(persona_case(tokenizer))
    variants, variant_info = {}, []
    for v in args.variants:
        pc, info = build_variant(model, tokenizer, v, args.placement)
        variant_info.append(info)
        if pc is None:
            print(f"variant {v.label}: skipped ({info['skipped']})", flush=True)
            continue
        variants[v.key] = pc
    max_tokens = max(len(tokenizer(s)["input_ids"]) for s, _ in cases) + 256
    peers, missing = build_peers(args, max_tokens)
    rows = []
    try:
        for schema, prompt in cases:
            rows.append(measure(pcs, schema, prompt, args.repeats, variants, peers, args.only == "scaffold"))
            r = rows[-1]
            extra = " ".join(f"{k}_c={r[k + '_c_ms']:.1f}" for k in [*variants, *peers])
            print(f"  {r['case']}: a={r['a_baseline_ms']:.1f} c={r['c_scaffold_ms']:.1f} {extra} ms", flush=True)
    finally:
        for peer in peers.values():
            peer.close()
    print()
    print_table(rows, SCAFFOLD_COLUMNS if args.only == "scaffold" else TTFT_COLUMNS)
    ratios = []
    if variants or peers:
        shown = [v for v in args.variants if v.key in variants]
        for stat in ("median", "min"):
            part = ratio_rows(rows, first_label, shown, list(peers), stat)
            ratios += part
            print(f"\nfast path, {stat} of {args.repeats} interleaved runs (c/first c: target <= 0.5 for the "
                  "compiled bf16 persona case; c/peer c: target < 1; a/vllm a: target <= 1.3)")
            print_table(part, ratio_columns(list(peers)))
    out = Path(args.out)
    write_csv(rows, out.with_suffix(".csv"))
    for v in args.variants:
        if v.key in variants and v.compile:
            next(i for i in variant_info if i["variant"] == v.label)["compile_report"] = compile_report(variants[v.key])
    first_report = compile_report(pcs["scaffold"]) if args.compile else None
    meta = {"model": args.model, "random_weights": args.random_weights, "device": str(model.device),
            "first_column": first_label, "first_column_compile_report": first_report, "placement": args.placement, "threads": torch.get_num_threads(),
            "repeats": args.repeats, "load_average_start": load, "load_average_end": os.getloadavg(),
            "variants": variant_info, "peers_missing": missing, "torch": torch.__version__}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=1,
                                                   default=str))
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.csv')}, {out.with_suffix('.json')} and (with document cases) "
          f"{out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
