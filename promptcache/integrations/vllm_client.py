"""Send a PML prompt to vLLM's OpenAI server with PromptCacheConnector (imports no vLLM).

Why: the OpenAI server takes ``kv_transfer_params`` in the body of ``/v1/completions`` and hands
them to the connector; ``prompt`` may be the token id list :func:`render` lays out. This is the
server path's small, runnable example (docs/vllm.md, "OpenAI server")::

    python -m promptcache.integrations.vllm_client --url http://127.0.0.1:8000 \\
        --schema island.xml --prompt island.prompt.xml --store /srv/pc-store [--approximate]

It prints one JSON line: the answer, the prompt's token count, the tokens promptcache can supply
and vLLM's ``usage.prompt_tokens_details.cached_tokens`` (start the server with
``--enable-prompt-tokens-details`` to get it).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

from .vllm_render import KeyContext, render, supplied_tokens


def completion_body(ids: list[int], params: dict[str, Any], model: str, max_tokens: int) -> dict[str, Any]:
    """The ``/v1/completions`` body: token ids as the prompt, params where vLLM reads them."""
    return {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
            "kv_transfer_params": params}


def post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """POST ``body`` as JSON to ``url``/v1/completions; the parsed answer."""
    req = urllib.request.Request(url.rstrip("/") + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="vLLM server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--schema", required=True, type=Path)
    ap.add_argument("--prompt", required=True, help="PML prompt file, or PML text")
    ap.add_argument("--store", default=None, help="the connector's store (marks spans stored/missing)")
    ap.add_argument("--model", default="smollm2", help="promptcache model (for the keys)")
    ap.add_argument("--served-model", default=None, help="vLLM's model name (default: the server's first)")
    ap.add_argument("--encoding", default="scaffold", choices=["scaffold", "independent"])
    ap.add_argument("--approximate", action="store_true", help="non-prefix selections (docs/vllm.md)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)

    from ..loading import load_model

    model, tok = load_model(args.model, device="cpu")
    keys = KeyContext.from_model(model, tok, args.encoding)
    prompt = args.prompt if args.prompt.lstrip().startswith("<") else Path(args.prompt).read_text()
    ids, params = render(prompt, args.schema, keys=keys, store=args.store, approximate=args.approximate)
    served = args.served_model
    if served is None:
        with urllib.request.urlopen(args.url.rstrip("/") + "/v1/models", timeout=args.timeout) as resp:
            served = json.loads(resp.read())["data"][0]["id"]
    out = post(args.url, completion_body(ids, params, served, args.max_tokens), args.timeout)
    usage = out.get("usage") or {}
    print(json.dumps({"text": out["choices"][0]["text"], "prompt_tokens": len(ids),
                      "supplied": supplied_tokens(params),
                      "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
