"""demo.py --store on the real default model: the second process loads every module from the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo(store: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "demo.py"), "--store", str(store), "--json", "--max-new-tokens", "8",
           "--device", "cpu"]
    # One intra-op thread: on a busy 2-core machine torch's thread pool stalls (see docs/store.md).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_demo_json_with_store_loads_the_second_time(tmp_path):
    store = tmp_path / "store"
    first = demo(store)
    assert first["store_hits"] == 0 and first["store_misses"] > 0 and first["encode_ms"] > 0
    second = demo(store)
    assert second["store_hits"] == first["store_misses"] and second["store_misses"] == 0
    assert second["encode_ms"] == 0.0
    assert second["text"] == first["text"] and second["cached_tokens"] == first["cached_tokens"] > 0
