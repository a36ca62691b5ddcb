"""The ``promptcache`` command line.

Each subcommand lives in one ``register_<name>(subparsers)`` function that adds its parser and
sets ``func=<handler>``; a handler takes ``(args, ctx)`` and returns the exit status. To add a
subcommand, write such a function and append it to :data:`SUBCOMMANDS`. :class:`Context` carries
what tests inject instead of real models (today: a token renderer).

Errors of the PML layer are printed as ``FILE:LINE: message`` on stderr with exit status 2.

Size: the argument parsing of five subcommands (validate, analyze, encode, store, serve) and their
argument checks, kept in one file so the whole command line reads in one place; the work itself
lives in the modules each handler calls (imported lazily, so ``--help`` never imports torch).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from .pml.errors import PMLError
from .pml.layout import TokenRenderer

EXIT_OK = 0
EXIT_ERROR = 2
DEFAULT_TOKENIZER = "smollm2"


@dataclass
class Context:
    """Things a subcommand would otherwise build itself; tests pass fakes here."""

    renderer: TokenRenderer | None = None

    def get_renderer(self, tokenizer: str | None, toy: bool = False) -> TokenRenderer:
        """The injected renderer, else a toy one (``toy``), else the chat renderer of a tokenizer."""
        if self.renderer is not None:
            return self.renderer
        if toy:
            from .pml.toyrenderer import ToyRenderer
            return ToyRenderer()
        from .loading import load_tokenizer  # heavy (transformers): import only when needed
        from .roles import ChatRenderer
        return ChatRenderer(load_tokenizer(tokenizer or DEFAULT_TOKENIZER))


class CommandError(Exception):
    """A user-facing failure outside PML (unreadable input, missing tokenizer...): exit 2."""


# ---------------------------------------------------------------- validate


def register_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="check a PML schema (and optionally a prompt) and print its layout",
        description="Parse a PML schema, lay it out with the model's tokenizer and print the "
                    "position table (every module, union, parameter and text run with its token "
                    "range; a union's row names its scaffold member, the first one unless the "
                    "schema names another or says scaffold=\"\"). With --prompt, also parse the prompt and check it against the schema "
                    "(modules exist, at most one member per union, arguments fit their parameters).",
        epilog="Errors are printed as FILE:LINE: message and exit with status 2. Files are read "
               "only if they are regular files within the size limits of docs/security.md.")
    p.add_argument("schema", metavar="SCHEMA.xml", help="the schema file")
    p.add_argument("--prompt", metavar="PROMPT.xml", help="a prompt file to check against the schema")
    p.add_argument("--allowed-root", metavar="DIR", default=None,
                   help="folder that src= includes must lie in (default: the schema's own folder)")
    p.add_argument("--tokenizer", metavar="NAME_OR_PATH", default=None,
                   help=f"tokenizer used for the layout (default: {DEFAULT_TOKENIZER})")
    p.add_argument("--toy-tokenizer", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run_validate)


def run_validate(args: argparse.Namespace, ctx: Context) -> int:
    from .pml.layout import build_layout
    from .pml.parser import load_prompt, load_schema

    schema = load_schema(args.schema, allowed_root=args.allowed_root)
    try:
        renderer = ctx.get_renderer(args.tokenizer, args.toy_tokenizer)
    except (OSError, ValueError, RuntimeError) as e:  # loading.ModelLoadError is a RuntimeError
        name = args.tokenizer or DEFAULT_TOKENIZER
        message = str(e) if name in str(e) else f"cannot load tokenizer {name!r}: {e}"
        raise CommandError(message) from e
    layout = build_layout(schema, renderer)
    prompt = None
    if args.prompt:  # bound before the table is printed: on error only the error shows
        from .pml.binding import bind
        prompt = load_prompt(args.prompt)
        try:
            bind(prompt, layout, renderer)
        except PMLError as e:
            if e.file is None:
                e.file = args.prompt
            raise
    print(layout.table())
    if prompt is not None:
        print(f"prompt {args.prompt}: OK, {summarize_prompt(prompt)}")
    return EXIT_OK


def summarize_prompt(prompt) -> str:
    """One line: which modules a prompt selects, how many arguments, what its suffix holds."""
    paths: list[str] = []
    n_args = 0

    def walk(selections, prefix: str) -> None:
        nonlocal n_args
        for s in selections:
            paths.append(prefix + s.name)
            n_args += len(s.args)
            walk(s.children, prefix + s.name + "/")

    walk(prompt.selections, "")
    turns = [t.role or "text" for t in prompt.suffix]
    selected = ", ".join(paths) if paths else "nothing"
    return (f"schema {prompt.schema!r}, selects {len(paths)} module(s) ({selected}), "
            f"{n_args} argument(s), suffix: {' + '.join(turns) if turns else 'empty'}")


# ---------------------------------------------------------------- analyze


def register_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", add_help=False, help="estimate what automatic prefix caching saves on a JSONL batch",
        description="See `promptcache analyze --help`.")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args, ctx: _analyze(args.rest))


def _analyze(rest: list[str]) -> int:
    from .prefix.analyze import analyze_main  # its own parser gives the full --help

    try:
        return analyze_main(rest)
    except SystemExit as exit_:  # argparse inside analyze_main
        return int(exit_.code or 0)


# ---------------------------------------------------------------- encode


def register_encode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode", help="precompute a schema's module caches into a store",
        description="Encode every cacheable module of a PML schema with a model and write the caches "
                    "to a store (a directory or redis://host:port/db), so that later processes load "
                    "them instead of encoding. Modules already in the store are skipped (loaded).",
        epilog="Use the same --model, --dtype and --encoding as the processes that will read the store: "
               "they are part of every entry's key.")
    p.add_argument("schema", metavar="SCHEMA.xml", help="the schema file")
    p.add_argument("--store", required=True, metavar="DIR|URL",
                   help="store directory, file:///DIR, redis://HOST:PORT/DB or memory://")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help=f"model alias, local folder or Hugging Face id (default: {DEFAULT_TOKENIZER})")
    p.add_argument("--encoding", choices=["scaffold", "independent"], default="scaffold",
                   help="encoding policy (default: scaffold)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    add_threads_argument(p)
    p.add_argument("--json", action="store_true",
                   help="print the report as one JSON object (progress still goes to stderr)")
    p.set_defaults(func=run_encode)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N`` for commands that run the model (same rule as demo.py and the eval scripts)."""
    from .loading import DEFAULT_THREADS, THREADS_HELP  # light: no torch

    p.add_argument("--threads", type=_non_negative_int, default=DEFAULT_THREADS, metavar="N", help=THREADS_HELP)


def _non_negative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def status(command: str, message: str) -> None:
    """A progress line on stderr, so that no phase of a long command is silent (stdout stays the result)."""
    print(f"promptcache {command}: {message}", file=sys.stderr, flush=True)


def run_encode(args: argparse.Namespace, ctx: Context) -> int:
    import json
    import time

    from .engine import PromptCache
    from .loading import ModelLoadError, check_device, load_model, set_threads
    from .pml.parser import load_schema
    from .store import StoreError, open_store

    if not args.store.strip():  # open_store("") would make a store in the current folder
        raise CommandError("--store is empty: give a directory, file:///DIR, redis://HOST:PORT/DB or memory://")
    try:
        device = check_device(args.device)  # before anything is created or loaded
    except ModelLoadError as e:
        raise CommandError(str(e)) from e
    set_threads(args.threads)
    schema = load_schema(args.schema)  # PML errors first, before the model is loaded
    try:
        store = open_store(args.store)
    except (StoreError, OSError, ValueError) as e:
        raise CommandError(f"cannot open store {args.store!r}: {e}") from e
    if not store.ping():
        raise CommandError(f"store {store.url} is unreachable")
    name = args.model or DEFAULT_TOKENIZER
    t0 = time.perf_counter()
    status("encode", f"loading model {name} on {device}...")
    try:
        model, tokenizer = load_model(name, device=device, dtype=args.dtype)
    except (OSError, ValueError, RuntimeError) as e:  # ModelLoadError is a RuntimeError
        raise CommandError(str(e) if name in str(e) else f"cannot load model {name!r}: {e}") from e
    load_s = time.perf_counter() - t0
    pc = PromptCache(model, tokenizer, encoding=args.encoding, store=store, progress=not args.json)
    status("encode", f"encoding schema {schema.name!r} into {store.url}...")
    report = pc.add_schema(schema)
    tiers = pc.memory_report()["tiers"]["store"]
    out = {"schema": report.schema, "store": store.url, "model": name, "encoding": report.policy,
           "segments": report.segments, "stored_tokens": report.stored_tokens,
           "encoded_segments": report.encoded_segments, "loaded_segments": report.store_hits,
           "forwards": report.forwards, "encode_ms": round(report.encode_s * 1000, 3),
           "load_ms": round(report.load_s * 1000, 3), "bytes": report.bytes,
           "failed_puts": tiers["failed_puts"], "model_load_ms": round(load_s * 1000, 3)}
    store.close()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"schema {out['schema']!r} ({out['encoding']}): {out['segments']} segments, "
              f"{out['stored_tokens']} tokens, {out['bytes'] / 2 ** 20:.1f} MiB; "
              f"{out['encoded_segments']} encoded in {out['forwards']} forwards ({out['encode_ms']:.0f} ms), "
              f"{out['loaded_segments']} already in {out['store']}")
    if out["failed_puts"]:
        print(f"promptcache encode: {out['failed_puts']} entries could not be written to the store",
              file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


# ---------------------------------------------------------------- store


def register_store(sub: argparse._SubParsersAction) -> None:
    """``promptcache store ...`` is parsed by :func:`promptcache.store.cli.add_store_subcommands`
    (see :func:`_store`); this stub only lists it, so other commands do not import torch."""
    p = sub.add_parser("store", add_help=False, help="inspect and maintain a module-cache store "
                       "(ls, stats, verify, rm, gc)", description="See `promptcache store --help`.")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args, ctx: _store(args.rest))


def _store(rest: list[str]) -> int:
    from .store.cli import add_store_subcommands

    parser = argparse.ArgumentParser(prog="promptcache")
    add_store_subcommands(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["store", *rest])
    except SystemExit as exit_:  # --help (0) or a usage error (2)
        return EXIT_ERROR if exit_.code else EXIT_OK
    return args.func(args)


# ---------------------------------------------------------------- serve


def register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run an OpenAI-compatible HTTP server (PML prompts, batched decoding, metrics)",
        description="Serve one model over HTTP: /v1/completions (plain text or PML <prompt schema=...>), "
                    "/v1/chat/completions (prefix caching), /v1/models, /v1/schemas, /v1/adapters (LoRA), /health and "
                    "/metrics (Prometheus). Concurrent requests wait in a bounded queue and decode "
                    "together. Needs the serve extra: pip install 'promptcache[serve]'.",
        epilog="Keys: clients send Authorization: Bearer KEY. Without an API key the server is open "
               "(fine on 127.0.0.1); without an admin key schemas cannot be added or deleted over HTTP. "
               "See docs/serve.md and docs/security.md.")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help=f"model alias, local folder or Hugging Face id (default: {DEFAULT_TOKENIZER})")
    p.add_argument("--schema", action="append", default=[], metavar="FILE",
                   help="a PML schema file to add at start (repeatable); its src= files resolve in its folder")
    p.add_argument("--store", default=None, metavar="DIR|URL",
                   help="module-cache store: a directory, file:///DIR, redis://HOST:PORT/DB or memory://")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="key clients must send on /v1/* (default: $PROMPTCACHE_API_KEY; none: open)")
    p.add_argument("--admin-key", default=None, metavar="KEY",
                   help="key that may add/delete schemas (default: $PROMPTCACHE_ADMIN_KEY; none: off)")
    p.add_argument("--max-batch", type=_positive_int, default=8, metavar="N",
                   help="requests decoded together in one step (default: %(default)s)")
    p.add_argument("--max-queue", type=_positive_int, default=64, metavar="N",
                   help="requests that may wait; more are answered 429 (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=_positive_int, default=256, metavar="TOKENS",
                   help="prompt tokens prefilled per step while other requests decode (default: %(default)s)")
    p.add_argument("--request-timeout", type=_positive_seconds, default=600.0, metavar="SECONDS",
                   help="deadline of every request, from arrival to its end (default: %(default)s)")
    p.add_argument("--encoding", choices=["scaffold", "independent"], default="scaffold",
                   help="encoding policy (default: scaffold)")
    p.add_argument("--recompute", default="none", metavar="POLICY",
                   help="default selective-recompute policy: none, boundary:K, deviation:R, full")
    p.add_argument("--allowed-schema-root", default=None, metavar="DIR",
                   help="the one folder whose files src= may include in schemas uploaded over HTTP "
                        "(default: none, uploaded schemas include no file)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA adapter folder to load at start as NAME (repeatable); requests pick it "
                        "with model=NAME (docs/lora.md; needs the lora extra)")
    p.add_argument("--allowed-adapter-root", default=None, metavar="DIR",
                   help="the one folder POST /v1/adapters may load adapters from (default: none, loading "
                        "adapters over HTTP is off)")
    p.add_argument("--max-body-bytes", type=_positive_int, default=None, metavar="N",
                   help="largest request body of the generation endpoints (default: 2 MiB)")
    p.add_argument("--default-max-tokens", type=_positive_int, default=16, metavar="N",
                   help="max_tokens when a request gives none (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--compile", action="store_true",
                   help="compiled prefill/decode of PML requests over a static KV buffer, warmed up at "
                        "start (docs/fastpath.md)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_threads_argument(p)
    p.set_defaults(func=run_serve)


def _adapter_flags(specs: list[str]) -> dict:
    """``--adapter NAME=DIR`` flags as ``{name: folder}``, names and folders checked (docs/lora.md)."""
    from .lora import check_folder, check_name

    out = {}
    for spec in specs:
        name, _, folder = spec.partition("=")
        try:
            checked = check_name(name)  # the name first: it is what the user typed first
            out[checked] = check_folder(folder)
        except ValueError as e:
            raise CommandError(f"--adapter {spec!r}: {e}") from e
    return out


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a whole number >= 1, got 0")
    return value


def _positive_seconds(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def run_serve(args: argparse.Namespace, ctx: Context) -> int:
    """Load the model, add the schemas, start the engine thread, then uvicorn until interrupted."""
    import logging

    try:
        import fastapi  # noqa: F401  (checked first: a missing extra is one line, not a traceback)
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise CommandError(f"the serve extra is not installed ({e.name} missing): "
                           "pip install 'promptcache[serve]'") from e
    from .engine import PromptCache
    from .loading import ModelLoadError, check_device, load_model, set_threads
    from .pml.parser import load_schema
    from .serve.app import create_app
    from .serve.config import ADMIN_KEY_ENV, API_KEY_ENV, MAX_BODY_BYTES, ServeConfig, key_from
    from .serve.metrics import ServeMetrics
    from .serve.scheduler import Scheduler

    try:
        device = check_device(args.device)
    except ModelLoadError as e:
        raise CommandError(str(e)) from e
    set_threads(args.threads)
    schemas = [load_schema(path) for path in args.schema]  # PML errors before the model loads
    adapters = _adapter_flags(args.adapter)  # so are bad --adapter names and folders
    name = args.model or DEFAULT_TOKENIZER
    try:
        config = ServeConfig(model_name=name, api_key=key_from(args.api_key, API_KEY_ENV),
                             admin_key=key_from(args.admin_key, ADMIN_KEY_ENV),
                             allowed_schema_root=args.allowed_schema_root,
                             allowed_adapter_root=args.allowed_adapter_root,
                             max_body_bytes=args.max_body_bytes or MAX_BODY_BYTES,
                             default_max_tokens=args.default_max_tokens)
    except ValueError as e:
        raise CommandError(str(e)) from e
    if args.store is not None and not args.store.strip():
        raise CommandError("--store is empty: give a directory, file:///DIR, redis://HOST:PORT/DB or memory://")
    status("serve", f"loading model {name} on {device}...")
    try:
        model, tokenizer = load_model(name, device=device, dtype=args.dtype)
    except (OSError, ValueError, RuntimeError) as e:  # ModelLoadError is a RuntimeError
        raise CommandError(str(e) if name in str(e) else f"cannot load model {name!r}: {e}") from e
    try:
        pc = PromptCache(model, tokenizer, encoding=args.encoding, store=args.store, recompute=args.recompute,
                         progress=False, compile=args.compile)
    except ValueError as e:
        raise CommandError(str(e)) from e
    for adapter, folder in adapters.items():
        status("serve", f"loading LoRA adapter {adapter!r}...")
        try:
            pc.load_adapter(adapter, folder)
        except ValueError as e:  # AdapterError: not loadable, or peft missing
            raise CommandError(f"--adapter {adapter}={folder}: {e}") from e
    for schema in schemas:
        status("serve", f"encoding schema {schema.name!r}...")
        pc.add_schema(schema)
    if args.compile:
        status("serve", f"compiling (warm-up)... {pc.warmup(suffix_lengths=(1, 16, 64, args.prefill_chunk))}")
        if pc.fast is not None:  # a request whose own bucket is not compiled runs in a compiled bigger one
            pc.fast.prefer_compiled = True
    if config.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        status("serve", f"warning: listening on {args.host} without an API key: anyone who can reach it "
                        "can use it (--api-key or PROMPTCACHE_API_KEY)")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = ServeMetrics()
    try:
        scheduler = Scheduler(pc, max_batch=args.max_batch, max_queue=args.max_queue,
                              prefill_chunk=args.prefill_chunk, default_deadline_s=args.request_timeout,
                              observer=metrics)
    except ValueError as e:
        raise CommandError(str(e)) from e
    scheduler.start()
    try:
        app = create_app(pc, scheduler, config, metrics)
        status("serve", f"serving {name} on http://{args.host}:{args.port}")
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        scheduler.stop()
    return EXIT_OK


# ---------------------------------------------------------------- plumbing

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [register_validate, register_analyze,
                                                                   register_encode, register_store,
                                                                   register_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptcache",
        description="Prompt Cache tools: PML schemas whose module attention states are computed "
                    "once and reused across prompts.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def format_error(err: PMLError) -> str:
    """``FILE:LINE: message`` (column added when known; ``<string>`` when there is no file)."""
    return err.location_prefix() + err.message if (err.file or err.line) else err.message


def main(argv: Sequence[str] | None = None, renderer: TokenRenderer | None = None) -> int:
    """Entry point of the ``promptcache`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["analyze"]:  # has its own parser (and --help)
        return _analyze(argv[1:])
    if argv[:1] == ["store"]:  # likewise (promptcache.store.cli)
        return _store(argv[1:])
    args = build_parser().parse_args(argv)
    ctx = Context(renderer=renderer)
    try:
        return args.func(args, ctx)
    except PMLError as e:
        print(format_error(e), file=sys.stderr)
        return EXIT_ERROR
    except CommandError as e:
        print(f"promptcache {args.command}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except ImportError as e:
        print(f"promptcache {args.command}: a component is not available: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
