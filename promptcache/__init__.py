"""promptcache: modular attention reuse (Prompt Cache) for transformers models.

    from promptcache import PromptCache, load_model, load_prompt
    model, tokenizer = load_model("smollm2")
    pc = PromptCache(model, tokenizer)
    pc.add_schema("examples/persona.xml")
    res = pc.generate(load_prompt("examples/persona.prompt.xml"), max_new_tokens=64)

Names are imported lazily, so ``promptcache.pml`` and the CLI's ``validate`` do not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PromptCache": "engine", "GenerationResult": "results", "EncodeReport": "results",
    "oracle_forward": "runtime.runner", "Plan": "plan", "load_model": "loading", "load_tokenizer": "loading",
    "ModelLoadError": "loading", "PMLError": "pml.errors", "PMLSyntaxError": "pml.errors",
    "PromptError": "pml.errors", "SchemaError": "pml.errors", "load_prompt": "pml.parser",
    "load_schema": "pml.parser",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'promptcache' has no attribute {name!r}")
