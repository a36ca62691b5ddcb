"""Faults a shared cache store must survive without ever returning wrong data.

Killed writers, flipped/truncated bytes, a Redis server that goes away, concurrent writers and
readers racing writers. Every outcome must be "the right entry" or "a miss (+ one warning)".
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

from promptcache.store import StoreWarning, open_store

try:
    from store_helpers import make_entry, same_bits, write_many
    from redis_fixture import RedisServer, redis_server, redis_url  # noqa: F401  (fixtures)
except ImportError:  # tests/ imported as a package
    from tests.store_helpers import make_entry, same_bits, write_many
    from tests.redis_fixture import RedisServer, redis_server, redis_url  # noqa: F401

TESTS_DIR = str(Path(__file__).resolve().parent)
REPO = str(Path(__file__).resolve().parent.parent)


def _prefixed(redis_url: str, **opts) -> str:
    q = "&".join(f"{k}={v}" for k, v in opts.items())
    return f"{redis_url}?prefix=f{uuid.uuid4().hex[:8]}" + (f"&{q}" if q else "")


def _store_url(kind: str, tmp_path: Path, request, **opts) -> str:
    if kind == "local":
        return str(tmp_path / "store")
    return _prefixed(request.getfixturevalue("redis_url"), **opts)


def _child(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, TESTS_DIR])}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_line(proc: subprocess.Popen, want: str, timeout: float = 60.0) -> None:
    """Block until the child prints ``want`` (it signals that it reached the fault point)."""
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not result or result[0].strip() != want:
        proc.kill()
        raise AssertionError(f"child did not reach {want!r}: {result} {proc.stderr.read()[-3000:]}")


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _recorded_store_warnings(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    return [w for w in rec if issubclass(w.category, StoreWarning)]


# -- a writer killed mid-write ------------------------------------------------------------------

STALL_LOCAL = r"""
import os, sys, time
import promptcache.store.local as local
from promptcache.store import open_store
from store_helpers import make_entry
url, key, stage = sys.argv[1:4]
def stall(real):
    def wrapped(*a, **k):
        if stage == "before_publish":
            real(*a, **k)
        print("STALLED", flush=True)
        time.sleep(600)
    return wrapped
if stage == "before_publish":   # temp file complete, not yet renamed
    local.save_file = stall(local.save_file)
else:                           # holding the key's file lock, about to rename
    local.os.replace = stall(os.replace)
open_store(url).put(key, make_entry(seq=300, seed=7))
"""


@pytest.mark.parametrize("stage", ["before_publish", "holding_lock"])
def test_local_writer_killed_leaves_no_partial_entry(tmp_path, stage):
    url = str(tmp_path / "store")
    store = open_store(url)
    store.put("old", make_entry(seed=1))
    for key in ("new", "old"):  # a fresh key, and an overwrite of an existing entry
        proc = _child(STALL_LOCAL, url, key, stage)
        _wait_line(proc, "STALLED")
        _kill(proc)
        assert _recorded_store_warnings(lambda: store.get("new")) == []
        assert store.get("new") is None and not store.contains("new")
        assert same_bits(store.get("old"), make_entry(seed=1))  # old version intact
        assert [i.key for i in store.list()] == ["old"]
        assert store.verify() == []
    leftovers = list((tmp_path / "store" / "entries").rglob(".*.tmp"))
    if stage == "before_publish":
        assert len(leftovers) == 2  # invisible to readers...
    assert store.sweep(max_age_s=0) == len(leftovers)  # ...and swept by gc
    assert not list((tmp_path / "store" / "entries").rglob(".*.tmp"))
    # The dead writer's lock died with it: writing the same keys works at once.
    t = time.monotonic()
    store.put("new", make_entry(seed=2))
    assert time.monotonic() - t < 10
    assert same_bits(store.get("new"), make_entry(seed=2))


LOOP_WRITER = r"""
import sys
from promptcache.store import open_store
from store_helpers import make_entry
url, key = sys.argv[1:3]
store = open_store(url)
for i in range(100000):
    store.put(key, make_entry(n_layers=30, seq=400, heads=3, head_dim=64, seed=i % 5))
    if i == 0:
        print("STARTED", flush=True)
"""


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_writer_killed_at_random_moments(kind, tmp_path, request):
    """SIGKILL a writer that keeps overwriting a ~9 MB entry: never a partial or mixed entry."""
    url = _store_url(kind, tmp_path, request, chunk_bytes=1 << 20)
    store = open_store(url)
    rng = random.Random(1234)
    valid = {s: make_entry(n_layers=30, seq=400, heads=3, head_dim=64, seed=s) for s in range(5)}
    for _ in range(3):
        proc = _child(LOOP_WRITER, url, "hot")
        _wait_line(proc, "STARTED")
        time.sleep(rng.uniform(0.05, 0.8))
        _kill(proc)
        got = store.get("hot")
        assert got is not None  # the first write completed, so some version is published
        assert same_bits(got, valid[got.meta["seed"]])
        assert store.verify() == []
    assert [i.key for i in store.list()] == ["hot"]


STALL_REDIS = r"""
import sys, time
from promptcache.store import open_store
from store_helpers import make_entry
url, key = sys.argv[1:3]
store = open_store(url)
def stall(*a, **k):            # chunks are written; the publishing MULTI/EXEC is next
    print("STALLED", flush=True)
    time.sleep(600)
store.client.pipeline = stall
store.put(key, make_entry(seq=300, seed=7))
"""


def test_redis_writer_killed_before_publish(redis_url):
    url = _prefixed(redis_url, chunk_bytes=2048)
    store = open_store(url)
    store.put("old", make_entry(seed=1))
    for key in ("new", "old"):
        proc = _child(STALL_REDIS, url, key)
        _wait_line(proc, "STALLED")
        _kill(proc)
        assert store.get("new") is None and not store.contains("new")
        assert same_bits(store.get("old"), make_entry(seed=1))
        assert [i.key for i in store.list()] == ["old"]
        assert store.verify() == []
    orphans = list(store.client.scan_iter(match=f"{store.prefix}:*:c:*"))
    live = store.chunk_keys("old", __import__("json").loads(store.client.get(store.manifest_key("old"))))
    pending = [o.decode() for o in orphans if o.decode() not in live]
    assert pending and all(0 < store.client.pttl(p) <= store.pending_ttl * 1000 for p in pending)
    assert store.sweep(max_age_s=3600) == 0  # young: might be a writer still at work
    assert store.sweep(max_age_s=0) == len(pending)
    assert same_bits(store.get("old"), make_entry(seed=1))


# -- corrupted and truncated data ---------------------------------------------------------------

def _entry_file(store, key: str) -> Path:
    return store.entry_path(key)


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x5A
    path.write_bytes(bytes(data))


def _header_len(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _corrupt_local(store, key: str, how: str) -> None:
    p = _entry_file(store, key)
    size = p.stat().st_size
    if how == "flip-data":
        _flip(p, size - 17)
    elif how == "flip-header":
        _flip(p, _header_len(p) // 2)
    elif how == "truncate":
        os.truncate(p, size // 2)
    elif how == "truncate-to-zero":
        os.truncate(p, 0)
    elif how == "wrong-key":
        other = make_entry(seed=99)
        store.put("other", other)
        os.replace(_entry_file(store, "other"), p)
    else:
        raise ValueError(how)


def _corrupt_redis(store, key: str, how: str) -> None:
    import json
    r = store.client
    man = json.loads(r.get(store.manifest_key(key)))
    chunks = store.chunk_keys(key, man)
    if how == "flip-data":
        b = r.getrange(chunks[-1], 3, 3)
        r.setrange(chunks[-1], 3, bytes([b[0] ^ 0x5A]))
    elif how == "flip-header":  # the manifest is the header
        man["meta"]["seed"] = 12345
        r.set(store.manifest_key(key), json.dumps(man))
    elif how == "truncate":
        r.set(chunks[1], r.get(chunks[1])[:-5], keepttl=True)
    elif how == "truncate-to-zero":
        r.delete(chunks[0])
    elif how == "wrong-key":
        r.set(store.manifest_key(key), b"{not json")
    else:
        raise ValueError(how)


def _corrupt_memory(store, key: str, how: str) -> None:
    entry = store.held(key)
    if how == "flip-header":
        entry.meta["seed"] = 12345
    elif how in ("truncate", "truncate-to-zero"):
        k = entry.kv.keys[-1]
        entry.kv.keys[-1] = k[:, : k.shape[1] // 2]
    else:
        entry.kv.values[0].view(-1)[3] += 1


CORRUPTERS = {"local": _corrupt_local, "redis": _corrupt_redis, "memory": _corrupt_memory}
HOWS = ["flip-data", "flip-header", "truncate", "truncate-to-zero", "wrong-key"]


@pytest.fixture(params=["memory", "local", "redis"])
def kind_store(request, tmp_path):
    kind = request.param
    if kind == "memory":
        s = open_store("memory://")
    else:
        s = open_store(_store_url(kind, tmp_path, request, chunk_bytes=512))
    yield kind, s
    s.close()


@pytest.mark.parametrize("how", HOWS)
def test_corruption_is_a_reported_miss_and_recomputable(kind_store, how):
    kind, store = kind_store
    good = make_entry(seq=40, seed=3)
    store.put("victim", good)
    store.put("bystander", make_entry(seed=4))
    CORRUPTERS[kind](store, "victim", how)

    ws = _recorded_store_warnings(lambda: [store.get("victim"), store.get("victim")])
    assert len(ws) == 1, [str(w.message) for w in ws]  # reported once...
    assert "victim" in str(ws[0].message)  # ...naming the key (and the cause)
    assert store.get("victim") is None and not store.contains("victim")
    assert store.verify() == []  # removed or quarantined
    assert same_bits(store.get("bystander"), make_entry(seed=4))
    store.put("victim", good)  # the engine recomputes and stores it again
    assert same_bits(store.get("victim"), good)


def test_every_flipped_byte_is_caught_or_harmless(tmp_path):
    """Flip bytes all over a file (header included): get() returns the original or None."""
    store = open_store(str(tmp_path / "s"))
    good = make_entry(n_layers=2, seq=6, seed=5)
    store.put("k", good)
    pristine = _entry_file(store, "k").read_bytes()
    size, caught = len(pristine), 0
    for pos in sorted(set(range(0, size, max(1, size // 150))) | set(range(8))):
        data = bytearray(pristine)
        data[pos] ^= 0x01
        path = _entry_file(store, "k")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(data))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StoreWarning)
            got = store.get("k")
        if got is None:
            caught += 1
        else:
            assert same_bits(got, good) and got.meta == good.meta, f"wrong data from flip at {pos}"
    assert caught >= 140  # all but cosmetic header bytes (e.g. padding) are detected


def test_verify_and_gc_report_bad_entries(kind_store):
    kind, store = kind_store
    for k in ("a", "b", "c"):
        store.put(k, make_entry(seq=40, seed=ord(k)))
    CORRUPTERS[kind](store, "a", "flip-data")
    CORRUPTERS[kind](store, "c", "truncate")
    bad = store.verify()
    assert sorted(b.key for b in bad) == ["a", "c"] and all(b.reason for b in bad)
    assert sorted(i.key for i in store.list()) == ["a", "b", "c"]  # verify() alone is read-only
    assert sorted(b.key for b in store.verify(remove=True)) == ["a", "c"]
    assert store.verify() == [] and [i.key for i in store.list()] == ["b"]


def test_damaged_index_is_rebuilt(tmp_path):
    store = open_store(str(tmp_path / "s"))
    store.put("a", make_entry(seed=1))
    store.put("b", make_entry(seed=2))
    store.close()
    (tmp_path / "s" / "index.sqlite").write_bytes(b"garbage" * 100)
    for p in (tmp_path / "s").glob("index.sqlite-*"):
        p.unlink()
    again = open_store(str(tmp_path / "s"))
    with pytest.warns(StoreWarning, match="rebuilding"):
        infos = again.list()
    assert sorted(i.key for i in infos) == ["a", "b"]
    assert infos[0].nbytes == make_entry().nbytes
    assert same_bits(again.get("b"), make_entry(seed=2))


# -- Redis going away -----------------------------------------------------------------------------

def test_redis_stopped_mid_run(redis_server):
    store = open_store(f"{redis_server.url}?retry_after=0&chunk_bytes=4096")
    store.put("k", make_entry(seed=1))
    assert same_bits(store.get("k"), make_entry(seed=1))
    redis_server.stop()

    def outage():
        assert store.get("k") is None
        assert store.put("k2", make_entry(seed=2)) is False  # skipped, not raised
        assert store.contains("k") is False
        assert store.delete("k") is False
        assert store.list() == [] and store.verify() == [] and store.sweep() == 0
        assert store.stats()["reachable"] is False
        assert store.get("k") is None
    ws = _recorded_store_warnings(outage)
    assert len(ws) == 1 and "unreachable" in str(ws[0].message)  # once per outage
    assert store.ping() is False

    again = RedisServer(redis_server.workdir, port=redis_server.port).start()  # back, empty
    try:
        assert _recorded_store_warnings(lambda: store.get("k")) == []
        assert store.put("k", make_entry(seed=3)) is True
        assert same_bits(store.get("k"), make_entry(seed=3))
        again.stop()  # a second outage is reported again
        assert len(_recorded_store_warnings(lambda: store.get("k"))) == 1
    finally:
        again.stop()


def test_redis_stopped_during_put(redis_server):
    store = open_store(f"{redis_server.url}?retry_after=0&chunk_bytes=1024")
    real_pipeline = store.client.pipeline

    def die_then_publish(*a, **k):  # chunks are written; the server dies before the manifest
        redis_server.stop()
        return real_pipeline(*a, **k)
    store.client.pipeline = die_then_publish
    ws = _recorded_store_warnings(lambda: store.put("k", make_entry(seq=100)))
    assert len(ws) == 1
    assert store.get("k") is None


def test_redis_breaker_skips_calls_while_down(redis_server):
    store = open_store(f"{redis_server.url}?retry_after=30")
    redis_server.stop()
    _recorded_store_warnings(lambda: store.get("k"))
    t = time.monotonic()
    for _ in range(100):
        assert store.get("k") is None and store.put("k", make_entry()) is False
    assert time.monotonic() - t < 2.0  # no connection attempts while the breaker is open


# -- concurrency ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["local", "redis"])
def test_two_processes_writing_at_once(kind, tmp_path, request):
    url = _store_url(kind, tmp_path, request, chunk_bytes=4096)
    shared = [f"shared-{i}" for i in range(4)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=write_many, args=(url, w, shared, 4, 4, 200)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = open_store(url)
    expected = set(shared) | {f"own-{w}-{i}" for w in (1, 2) for i in range(4)}
    ws = _recorded_store_warnings(lambda: store.verify())
    assert ws == [] and store.verify() == []
    assert {i.key for i in store.list()} == expected
    for key in expected:
        got = store.get(key)
        assert got is not None, key
        w = got.meta["writer"]
        seed = (1000 * w + shared.index(key)) if key in shared else 100000 + 1000 * w + int(key[-1])
        assert same_bits(got, make_entry(seq=200, seed=seed, meta={"writer": w}))
    assert store.sweep(max_age_s=0) == 0  # no orphaned temp files / chunks
    if kind == "local":
        assert store.stats()["entries"] == len(expected)


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_readers_racing_an_overwriting_writer(kind, tmp_path, request):
    """A reader sees a complete version or a miss, never a torn mix, while a writer overwrites."""
    url = _store_url(kind, tmp_path, request, chunk_bytes=1 << 16)
    versions = {s: make_entry(n_layers=30, seq=400, heads=3, head_dim=64, seed=s) for s in range(5)}
    store = open_store(url)
    store.put("hot", versions[0])
    proc = _child(LOOP_WRITER, url, "hot")
    _wait_line(proc, "STARTED")
    seen, deadline = set(), time.monotonic() + 3.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", StoreWarning)  # a race is never "bad data"
            while time.monotonic() < deadline:
                got = store.get("hot")
                if got is not None:
                    assert same_bits(got, versions[got.meta["seed"]])
                    seen.add(got.meta["seed"])
    finally:
        _kill(proc)
    assert len(seen) >= 2  # the race really happened


def test_redis_writer_stalled_past_pending_ttl_publishes_nothing(redis_url):
    store = open_store(_prefixed(redis_url, chunk_bytes=1024, pending_ttl=0.05))
    real_pipeline = store.client.pipeline

    def slow_publish(*a, **k):  # the pending chunks expire while the writer is stalled
        time.sleep(0.3)
        return real_pipeline(*a, **k)
    store.client.pipeline = slow_publish
    ws = _recorded_store_warnings(lambda: store.put("k", make_entry(seq=50)))
    assert store.client.exists(store.manifest_key("k")) == 0  # the incomplete entry was taken back
    assert len(ws) == 1 and "expired" in str(ws[0].message)
    assert _recorded_store_warnings(lambda: store.get("k")) == []  # a plain miss
    assert store.sweep(max_age_s=0) == 0  # nothing left behind (the chunks expired)


def test_redis_ttl_expiry_is_a_quiet_miss(redis_url):
    store = open_store(_prefixed(redis_url, ttl=1, chunk_bytes=1024))
    store.put("k", make_entry())
    assert same_bits(store.get("k"), make_entry())
    time.sleep(1.3)
    assert _recorded_store_warnings(lambda: store.get("k")) == []
    assert store.get("k") is None and store.list() == []


def test_local_write_failure_is_a_skipped_put(tmp_path, monkeypatch):
    import errno
    import promptcache.store.local as local
    store = open_store(str(tmp_path / "s"))
    store.put("k", make_entry(seed=1))

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(local, "save_file", disk_full)
    ws = _recorded_store_warnings(lambda: store.put("k", make_entry(seed=2)))
    assert len(ws) == 1 and "No space left" in str(ws[0].message)
    assert same_bits(store.get("k"), make_entry(seed=1))  # the old entry is untouched
    assert not list((tmp_path / "s" / "entries").rglob(".*.tmp"))  # no debris
