"""The toolbox ``eval.py`` (latency) and ``eval_acc.py`` (accuracy) use as ``runner.X``: names
gathered from the one-job modules, no code of its own.

Both scripts must pick the same tasks, build *the same* prompt per sample (truncation included) and
treat their files the same way, so that a latency number and an accuracy number always describe the
same tokens. Where each part lives:

* :mod:`eval.cli_args`: flags and their validation (``error: ...``, exit 2), tasks and data folders;
* :mod:`eval.setup`: engine keyword arguments, threads, device, the model's window, token budgets,
  machine info;
* :mod:`eval.prepare`: per-sample preparation (LongBench truncation, then the PML of
  :mod:`eval.schemas`);
* :mod:`eval.outputs`: refusing to overwrite, atomic whole-file writes, the crash-safe JSONL
  appender and its tolerant reader for resuming;
* :mod:`eval.numbers`: the first-token KL divergence and the median.

The engine's baseline (``use_cache=False``) computes exactly the prompt's token ids at contiguous
positions, so "cache vs no cache" differ only in how the KV of the context was obtained.
"""

from __future__ import annotations

from .cli_args import (DATA_DIR_FALLBACK, DATA_DIR_HELP, DATA_LAYOUT, DEFAULT_MODEL, MULTI_DOC_TASKS,
                       WINDOW_CAP, UserError, add_common_arguments, check_policy, load_samples,
                       non_negative_int, policy_list, positive_int, resolve_data_dir, resolve_tasks,
                       run_main, split_commas)
from .numbers import first_token_kl, median
from .outputs import (JsonlAppender, derived_path, output_paths, read_jsonl_records, refuse_existing,
                      save_figure_atomic, write_atomic, write_json_atomic, write_jsonl_atomic,
                      write_text_atomic)
from .prepare import (MIN_CONTEXT_TOKENS, PreparedSample, PromptTooLong, layout_prompt_tokens,
                      prepare_sample, schema_added, warm_up)
from .setup import (check_device, engine_kwargs, generation_length, machine_info, model_window,
                    prompt_budget, set_threads, task_budgets)
from .tasks import get_task

__all__ = [
    "DATA_DIR_FALLBACK", "DATA_DIR_HELP", "DATA_LAYOUT", "DEFAULT_MODEL", "MIN_CONTEXT_TOKENS",
    "MULTI_DOC_TASKS", "WINDOW_CAP", "JsonlAppender", "PreparedSample", "PromptTooLong", "UserError",
    "add_common_arguments", "check_device", "check_policy", "derived_path", "engine_kwargs",
    "first_token_kl", "generation_length", "get_task", "layout_prompt_tokens", "load_samples",
    "machine_info", "median", "model_window", "non_negative_int", "output_paths", "policy_list",
    "positive_int", "prepare_sample", "prompt_budget", "read_jsonl_records", "refuse_existing",
    "resolve_data_dir", "resolve_tasks", "run_main", "save_figure_atomic", "schema_added",
    "set_threads", "split_commas", "task_budgets", "warm_up", "write_atomic", "write_json_atomic",
    "write_jsonl_atomic", "write_text_atomic",
]
