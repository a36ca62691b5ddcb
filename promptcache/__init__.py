"""promptcache: modular attention reuse (Prompt Cache) for transformers models."""

__version__ = "0.1.0"
