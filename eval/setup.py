"""Engine setup for the eval scripts: one job, the model-side values a run needs before it starts
(engine keyword arguments, torch threads, device, the model's window and each task's token budget),
and a record of the machine the numbers came from.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
from typing import Any, Sequence

from .cli_args import WINDOW_CAP, UserError
from .tasks import TaskSpec, get_task


def engine_kwargs(args: argparse.Namespace, max_new_tokens: int) -> dict[str, Any]:
    """Keyword arguments for PromptCache; includes ``store`` only where the engine accepts it."""
    from promptcache.engine import PromptCache  # noqa: PLC0415

    kwargs: dict[str, Any] = {"encoding": args.encoding, "progress": False,
                              "reserve_tokens": max_new_tokens + 1}
    if getattr(args, "compile", False):
        kwargs["compile"] = True
    if getattr(args, "store", None):
        if "store" not in inspect.signature(PromptCache).parameters:
            raise UserError("--store is not supported by this version of the engine (PromptCache has no store=)")
        kwargs["store"] = args.store
    return kwargs


def set_threads(threads: int | None) -> None:
    """``--threads``: the same rule as demo.py and the CLI (:func:`promptcache.loading.set_threads`)."""
    from promptcache.loading import set_threads as set_torch_threads  # noqa: PLC0415

    set_torch_threads(threads)


def check_device(device: str | None) -> str:
    import torch  # noqa: PLC0415

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"bad --device {device!r} (expected cpu, cuda, cuda:N, ...)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return device


def model_window(name_or_path: str) -> int:
    """Prompt+generation window: the model's max positions, capped at :data:`WINDOW_CAP`.

    Read from the model's config alone, so flag values are checked before the weights load.
    """
    from transformers import AutoConfig  # noqa: PLC0415

    from promptcache.loading import ModelLoadError, resolve  # noqa: PLC0415

    try:
        config = AutoConfig.from_pretrained(resolve(name_or_path))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {err}") from err
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or WINDOW_CAP
    return min(int(limit), WINDOW_CAP)


def task_budgets(tasks: Sequence[str], window: int, max_length: int | None,
                 max_new_tokens: int | None) -> dict[str, tuple[int, int]]:
    """Per task: (max prompt tokens, generation length); every task checked before the run starts."""
    budgets = {}
    for task in tasks:
        gen_len = generation_length(get_task(task), max_new_tokens)
        budgets[task] = (prompt_budget(window, max_length, gen_len), gen_len)
    return budgets


def generation_length(spec: TaskSpec, override: int | None) -> int:
    return override if override is not None else spec.max_new_tokens


def prompt_budget(window: int, max_length: int | None, max_new_tokens: int) -> int:
    """Max prompt tokens: ``--max-length`` or, by default, the window minus the generation length."""
    if max_length is None:
        budget = window - max_new_tokens
        if budget < 16:
            raise UserError(f"generation length {max_new_tokens} leaves no room for a prompt in the "
                            f"model's window of {window} tokens")
        return budget
    if max_length + max_new_tokens > window:
        raise UserError(f"--max-length {max_length} plus the generation length {max_new_tokens} exceeds the "
                        f"model's window of {window} tokens")
    return max_length


def machine_info(device: str) -> dict[str, Any]:
    """Where the numbers came from (timings on a loaded machine are not comparable)."""
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415

    info: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
