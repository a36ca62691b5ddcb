"""The LoRA adapters loaded into one model, and which one is in force.

Adapters are loaded through transformers' own PEFT integration (``PeftAdapterMixin`` on the
model: ``load_adapter``, ``set_adapter``, ``disable_adapters``/``enable_adapters``,
``delete_adapter``). Those keep the SAME model object, so the family adapter's patches and the
:class:`~promptcache.runtime.runner.ModelRunner` stay valid. The runner calls :meth:`activate`
before every forward with the adapter its cache was made under; switching is skipped when the
right one is already in force, and costs nothing when no adapter was ever loaded.
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .fingerprint import adapter_fingerprint, base_fingerprint, combined_fingerprint

#: Adapter names: what the OpenAI ``model`` field and URLs carry.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Names that mean the base model (never an adapter's name).
BASE_NAMES = frozenset({"base"})
_BASE = object()  # "no adapter in force" (distinct from "unknown": None before the first switch)


class AdapterError(ValueError):
    """A bad adapter name, folder or request (the message says which and why)."""


class UnknownAdapterError(KeyError):
    """No adapter of that name is loaded (the message lists those that are)."""

    def __str__(self) -> str:  # KeyError quotes its argument; this one is a sentence
        return str(self.args[0])


@dataclass(frozen=True)
class AdapterInfo:
    """One loaded adapter: ``fingerprint`` hashes its weights and config; ``model_key`` is the
    fingerprint that goes into cache keys (base and adapter together)."""

    name: str
    path: str
    fingerprint: str
    model_key: str

    def as_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "fingerprint": self.fingerprint,
                "model_key": self.model_key}


def check_name(name: object) -> str:
    """``name`` if it can name an adapter, else :class:`AdapterError` saying what is allowed."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in BASE_NAMES:
        raise AdapterError(f"adapter name {name!r} is not allowed: use 1-64 characters of letters, digits, "
                           f"'.', '_' or '-', starting with a letter or digit, and not {sorted(BASE_NAMES)}")
    return name


def check_folder(path: str | os.PathLike, allowed_root: str | os.PathLike | None = None) -> Path:
    """The adapter folder, resolved; refused unless it holds ``adapter_config.json`` and, with
    ``allowed_root``, lies inside it (symlinks resolved first; checked before existence, so a
    refusal tells nothing about files outside the root). Never a Hub id: local only."""
    try:
        folder = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as err:  # ValueError: an embedded NUL byte
        raise AdapterError(f"adapter folder {str(path)!r} is not a usable path ({err.__class__.__name__})") from None
    if allowed_root is not None:
        root = Path(allowed_root).expanduser().resolve()
        if folder != root and root not in folder.parents:
            raise AdapterError(f"adapter folder {str(path)!r} is outside the allowed adapter root")
    if not folder.is_dir() or not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"adapter folder {str(path)!r} is not a PEFT adapter folder "
                           "(no adapter_config.json in it)")
    return folder


def _enable_adapters(model: torch.nn.Module) -> None:
    """``model.enable_adapters()`` that also re-enables ``modules_to_save`` copies: transformers'
    ``disable_adapters`` disables them, its ``enable_adapters`` (5.23) does not enable them again, so
    an adapter's own embedding copy would silently stay off after a base-model request."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    for module in model.modules():
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            module.enable_adapters(True)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' logging at error level, and no progress bar, for the duration."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class LoraRegistry:
    """The adapters loaded into ``model`` by name, their fingerprints, and the one in force."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._adapters: dict[str, AdapterInfo] = {}
        # what the model has in force now (None: unknown, e.g. adapters loaded before we got the model)
        self._active: object = None if getattr(model, "_hf_peft_config_loaded", False) else _BASE
        self.switches = 0

    # ------------------------------------------------------------------ catalogue

    def names(self) -> list[str]:
        """Loaded adapter names (a copy first: the HTTP thread reads this while the engine loads)."""
        return sorted(self._adapters.copy())

    def info(self, name: str) -> AdapterInfo:
        self.check(name)
        return self._adapters[name]

    def check(self, name: str | None) -> None:
        """Raise :class:`UnknownAdapterError` unless ``name`` is ``None`` (base) or loaded."""
        if name is not None and name not in self._adapters:
            have = ", ".join(self.names()) or "none"
            raise UnknownAdapterError(f"no LoRA adapter named {name!r} is loaded (loaded: {have})")

    def fingerprint(self, name: str | None = None) -> str:
        """The "model" part of cache keys under adapter ``name`` (``None``: the base model)."""
        if name is None:
            return base_fingerprint(self.model)
        return self.info(name).model_key

    def names_with(self, model_key: str) -> list[str]:
        """Loaded adapters whose weights and config are those of ``model_key``."""
        return [n for n, info in sorted(self._adapters.items()) if info.model_key == model_key]

    # ------------------------------------------------------------------ load, unload

    def load(self, name: str, path: str | os.PathLike, allowed_root: str | os.PathLike | None = None
             ) -> AdapterInfo:
        """Load the PEFT adapter in folder ``path`` as ``name`` (a local folder only)."""
        check_name(name)
        if name in self._adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        folder = check_folder(path, allowed_root)
        if not hasattr(self.model, "load_adapter"):
            raise AdapterError(f"{type(self.model).__name__} has no PEFT integration (load_adapter)")
        try:
            import peft  # noqa: F401
        except ImportError:
            raise AdapterError("LoRA adapters need the 'peft' package: pip install 'promptcache[lora]'") from None
        base = base_fingerprint(self.model)  # before: cached under the original names
        try:
            with _quiet_transformers(), warnings.catch_warnings():  # its load report calls the
                warnings.filterwarnings("ignore", message=".*multiple adapters")  # base weights "MISSING"
                self.model.load_adapter(str(folder), adapter_name=name, hotswap=False)
        except Exception as err:
            self._forget(name)
            raise AdapterError(f"adapter folder {str(path)!r} could not be loaded as {name!r}: {err}") from err
        finally:
            self._active = None  # load_adapter switches the model to the new adapter
        self.model.eval()
        try:
            fp = adapter_fingerprint(self.model, name)
        except ValueError as err:
            self._forget(name)
            raise AdapterError(str(err)) from None
        info = AdapterInfo(name, str(folder), fp, combined_fingerprint(base, fp))
        self._adapters[name] = info
        return info

    def unload(self, name: str) -> AdapterInfo:
        """Delete adapter ``name`` from the model; returns what it was."""
        info = self.info(name)
        del self._adapters[name]
        self._forget(name)
        return info

    def _forget(self, name: str) -> None:
        """Delete ``name`` from the model if PEFT holds it (after a failed or undone load)."""
        if name in (getattr(self.model, "peft_config", None) or {}):
            self.model.delete_adapter(name)
        self._active = None

    # ------------------------------------------------------------------ switching

    def mixable(self) -> bool:
        """Can one forward mix the loaded adapters? PEFT's ``adapter_names`` cannot mix DoRA, and
        :meth:`for_rows` hands them to LoRA layers only, not to ``modules_to_save`` copies."""
        configs = getattr(self.model, "peft_config", None) or {}
        return not any(getattr(configs.get(n), "use_dora", False) or getattr(configs.get(n), "modules_to_save", None)
                       for n in self._adapters)

    @contextmanager
    def for_rows(self, names: Sequence[str | None]) -> Iterator[None]:
        """One forward whose batch row ``i`` runs under adapter ``names[i]`` (``None``: base).

        All the same: that adapter is put in force. Mixed: PEFT's mixed-batch LoRA, every LoRA
        layer gets ``adapter_names`` (``"__base__"`` for base rows) through a forward pre-hook for
        the duration, and adds each row's own adapter to that row only."""
        if len(set(names)) <= 1:
            self.activate(names[0] if names else None)
            yield
            return
        for name in names:
            self.check(name)
        from peft.tuners.lora.layer import LoraLayer

        labels = ["__base__" if n is None else n for n in names]

        def inject(module, args, kwargs):  # noqa: ARG001
            return args, {**kwargs, "adapter_names": labels}

        _enable_adapters(self.model)
        self._active = None  # adapters enabled, none selected for the whole batch: unknown
        handles = [m.register_forward_pre_hook(inject, with_kwargs=True)
                   for m in self.model.modules() if isinstance(m, LoraLayer)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def activate(self, name: str | None) -> None:
        """Put adapter ``name`` (``None``: none, the base model) in force for the next forward."""
        want = _BASE if name is None else name
        if want is self._active or want == self._active:
            return
        if name is None:
            if self._adapters or getattr(self.model, "_hf_peft_config_loaded", False):
                self.model.disable_adapters()
        else:
            self.check(name)
            _enable_adapters(self.model)
            self.model.set_adapter(name)
        self._active = want
        self.switches += 1
