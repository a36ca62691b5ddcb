#!/usr/bin/env python
"""A multi-turn chat whose every turn reuses the KV of all previous turns (automatic prefix caching).

No PML: each turn passes the whole message list to ``pc.generate``. The prefix tree finds the
previous turns (and the previous answer, inserted with its generated tokens) and only the new
user message is computed. For comparison, each turn's prompt is also timed without prefix
caching (``use_cache=False``: one prefill of the whole history).

    .venv/bin/python examples/chat_multiturn.py                 # default model, 10 turns
    .venv/bin/python examples/chat_multiturn.py --turns 4 --max-new-tokens 32
    .venv/bin/python examples/chat_multiturn.py --jsonl examples/chat_multiturn.jsonl
                                                # then: promptcache analyze examples/chat_multiturn.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEM = ("You are a patient cooking teacher. You explain techniques step by step, name the "
          "reason behind each step, warn about common mistakes and keep answers short and "
          "practical. When a student asks about safety, you always mention temperatures.")
USER_TURNS = [
    "I want to bake my first loaf of bread. What do I need?",
    "How long should I knead the dough?",
    "My kitchen is cold. Will the dough still rise?",
    "How do I know when the first rise is done?",
    "What does shaping the loaf mean?",
    "Should I put water in the oven?",
    "At what temperature do I bake it, and for how long?",
    "How can I tell that the bread is cooked inside?",
    "Why should I wait before cutting it?",
    "How do I store the bread so it stays fresh?",
]


def run_chat(pc, turns: list[str], max_new_tokens: int, *, compare: bool = True,
             on_turn: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Play ``turns`` as one conversation; returns one row per turn (TTFTs, reuse, messages)."""
    messages = [{"role": "system", "content": SYSTEM}]
    rows = []
    for i, question in enumerate(turns, 1):
        messages.append({"role": "user", "content": question})
        row = {"turn": i}
        if compare:  # the same prompt, prefilled whole (before the cached run inserts anything)
            base = pc.generate(messages, max_new_tokens=1, use_cache=False)
            row["baseline_ttft_s"] = base.ttft_s
            row["baseline_first_logits"] = base.first_token_logits
        res = pc.generate(messages, max_new_tokens=max_new_tokens)
        row.update(prefix_ttft_s=res.ttft_s, prompt_tokens=res.prompt_tokens,
                   cached_tokens=res.cached_tokens, computed_tokens=res.computed_tokens,
                   answer=res.text.strip(), messages=[dict(m) for m in messages],
                   first_logits=res.first_token_logits)
        messages.append({"role": "assistant", "content": res.text})
        rows.append(row)
        if on_turn is not None:
            on_turn(i, row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--turns", type=int, default=len(USER_TURNS))
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--no-compare", action="store_true", help="skip the baseline timing per turn")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--jsonl", default=None, help="write each turn's prompt (messages) here, for "
                                                  "`promptcache analyze`")
    args = ap.parse_args(argv)

    import torch

    from promptcache import PromptCache, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    pc = PromptCache(model, tokenizer, progress=False)
    pc.generate("Warm-up.", max_new_tokens=1, insert_prefix=False)
    pc.prefix.reset_stats()

    def show(i: int, row: dict) -> None:
        base = row.get("baseline_ttft_s")
        timing = (f"TTFT {row['prefix_ttft_s'] * 1000:7.1f} ms with prefix caching"
                  + (f", {base * 1000:7.1f} ms without ({base / row['prefix_ttft_s']:.1f}x)" if base else ""))
        print(f"\n[turn {i}] user: {row['messages'][-1]['content']}")
        print(f"assistant: {row['answer']}")
        print(f"  {timing}; prompt {row['prompt_tokens']} tokens, {row['cached_tokens']} reused, "
              f"{row['computed_tokens']} computed", flush=True)

    rows = run_chat(pc, USER_TURNS[: args.turns], args.max_new_tokens, compare=not args.no_compare,
                    on_turn=show)
    stats = pc.prefix_stats()
    print("\nprefix cache:", ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in stats.items()))
    if args.jsonl:
        with open(args.jsonl, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"messages": row["messages"]}, ensure_ascii=False) + "\n")
        print(f"wrote {args.jsonl}: try `promptcache analyze {args.jsonl}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
