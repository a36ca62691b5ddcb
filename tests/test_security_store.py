"""Issue 12, store items: what a changed, swapped, damaged or hostile store can and cannot do.

* item 4: tensors loaded from a directory store are the process's own memory (``load=pread`` is
  the default): bytes flipped in the file afterwards, or the file truncated, change nothing
  (and cannot SIGBUS); ``load=mmap`` is an explicit opt-in.
* item 5: the checksum binds the entry key: a valid entry copied under another key, its recorded
  key rewritten, is refused (directory and Redis). Format-1 entries are stale: removed, warned once.
* item 6: Redis manifests are validated (non-objects, absurd chunk counts, wrong Redis types).
* item 7: a hung Redis server costs one bounded ``?timeout=``, not minutes.
* item 9: a FIFO (or device) at an entry path is a bad entry, never a blocking read.
* item 15: ``store rm``/``gc`` that cannot change a read-only store exit 2 with one line;
  ``gc --max-bytes`` refuses negative and non-finite sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from engine_fixtures import FULL_PROMPTS, FULL_SCHEMA, make_cache
from promptcache.store import StoreError, StoreWarning, open_store
from promptcache.store import local as local_mod
from promptcache.store.base import canonical_json
from promptcache.store.cli import main as store_main

try:
    from store_helpers import make_entry, same_bits
    from redis_fixture import free_port, redis_server, redis_url  # noqa: F401  (fixtures)
except ImportError:  # tests/ imported as a package
    from tests.store_helpers import make_entry, same_bits
    from tests.redis_fixture import free_port, redis_server, redis_url  # noqa: F401

TESTS_DIR = str(Path(__file__).resolve().parent)
REPO = str(Path(__file__).resolve().parent.parent)


def _store_warnings(fn) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, StoreWarning)]


def _redis_url(redis_url: str, **opts) -> str:
    q = "".join(f"&{k}={v}" for k, v in opts.items())
    return f"{redis_url}?prefix=sec{uuid.uuid4().hex[:8]}{q}"


# -- safetensors header surgery (what an attacker with write access to the store can do) ---------

def _read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


# -- item 4: loaded tensors are private memory -------------------------------------------------

def test_issue12_item4_safe_load_is_the_default_and_mmap_opt_in(tmp_path):
    assert open_store(str(tmp_path / "a")).load == "pread"
    assert open_store(f"file://{tmp_path / 'b'}").load == "pread"
    mm = open_store(f"file://{tmp_path / 'c'}?load=mmap")
    assert mm.load == "mmap"
    mm.put("k", make_entry(seed=2))
    assert same_bits(mm.get("k"), make_entry(seed=2))


def test_issue12_item4_bytes_flipped_after_loading_change_nothing(tmp_path):
    store = open_store(str(tmp_path / "s"))
    store.put("k", make_entry(n_layers=4, seq=512, heads=2, head_dim=64, seed=1))
    got = store.get("k")
    held = got.kv.clone()
    path = store.entry_path("k")
    _, data = _read_header(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:  # in place: same inode, the page cache changes
        f.seek(size - len(data))
        f.write(b"\xff" * len(data))  # every tensor byte becomes a NaN pattern
    for k, v, k0, v0 in zip(got.kv.keys, got.kv.values, held.keys, held.values):
        assert torch.equal(k, k0) and torch.equal(v, v0)
        assert not torch.isnan(k).any() and not torch.isnan(v).any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        assert store.get("k") is None  # the file itself is now bad: a miss for the next reader


_TRUNCATE_CHILD = r"""
import os, sys, torch, warnings
from promptcache.store import open_store
from store_helpers import make_entry
store = open_store(sys.argv[1] if len(sys.argv) < 3 else f"file://{sys.argv[1]}?load={sys.argv[2]}")
store.put("k", make_entry(n_layers=4, seq=2048, heads=2, head_dim=64, seed=3))
got = store.get("k")
held = got.kv.clone()
os.truncate(store.entry_path("k"), 0)
same = all(torch.equal(a, b) for a, b in zip(got.kv.keys + got.kv.values, held.keys + held.values))
print("same" if same else "changed", flush=True)
"""


def _run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, TESTS_DIR]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_issue12_item4_truncation_after_loading_is_harmless(tmp_path):
    """In a child process, so a SIGBUS fails this test instead of killing pytest."""
    out = _run_child(_TRUNCATE_CHILD, str(tmp_path / "s"))
    assert out.returncode == 0, f"child died with {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.strip() == "same"


def test_issue12_item4_control_mmap_really_is_exposed(tmp_path):
    """Control: with the opt-in mmap mode the same truncation does hit the held tensors
    (SIGBUS), which is what the default protects against and what the docs warn about."""
    out = _run_child(_TRUNCATE_CHILD, str(tmp_path / "s"), "mmap")
    assert out.returncode != 0 or out.stdout.strip() == "changed"


# -- item 5: the checksum binds the key --------------------------------------------------------

def test_issue12_item5_checksum_binds_key_directory(tmp_path):
    store = open_store(str(tmp_path / "s"))
    a, b = make_entry(seed=1, meta={"module": "a"}), make_entry(seed=2, meta={"module": "b"})
    store.put("key-a", a)
    store.put("key-b", b)
    header, data = _read_header(store.entry_path("key-a"))
    header["__metadata__"]["promptcache.key"] = "key-b"  # A's file, claiming to be B
    _write_header(store.entry_path("key-b"), header, data)
    got, ws = _store_warnings(lambda: store.get("key-b"))
    assert got is None, "entry A was served under key B"
    assert len(ws) == 1 and "key-b" in ws[0] and "checksum" in ws[0]
    assert same_bits(store.get("key-a"), a)


def test_issue12_item5_checksum_binds_module_meta_directory(tmp_path):
    store = open_store(str(tmp_path / "s"))
    store.put("key-a", make_entry(seed=1, meta={"module": "a"}))
    header, data = _read_header(store.entry_path("key-a"))
    meta = json.loads(header["__metadata__"]["promptcache.meta"])
    meta["module"] = "b"
    header["__metadata__"]["promptcache.meta"] = canonical_json(meta)
    _write_header(store.entry_path("key-a"), header, data)
    got, ws = _store_warnings(lambda: store.get("key-a"))
    assert got is None and len(ws) == 1


def test_issue12_item5_checksum_binds_key_redis(redis_url):
    store = open_store(_redis_url(redis_url))
    r = store.client
    a = make_entry(seed=1, meta={"module": "a"})
    store.put("key-a", a)
    store.put("key-b", make_entry(seed=2, meta={"module": "b"}))
    man = json.loads(r.get(store.manifest_key("key-a")))
    for i, ck in enumerate(store.chunk_keys("key-a", man)):  # A's chunks under B's names
        r.set(store.chunk_key("key-b", man["version"], i), r.get(ck))
    man["key"] = "key-b"
    r.set(store.manifest_key("key-b"), json.dumps(man))
    got, ws = _store_warnings(lambda: store.get("key-b"))
    assert got is None, "entry A was served under key B"
    assert len(ws) == 1 and "checksum" in ws[0]
    assert same_bits(store.get("key-a"), a)


def _downgrade_local(store, key: str) -> None:
    """Rewrite an entry as format 1 would have written it (checksum without the key)."""
    path = store.entry_path(key)
    header, data = _read_header(path)
    header["__metadata__"]["promptcache.format"] = "1"
    _write_header(path, header, data)


def test_issue12_item5_old_format_entries_are_stale_and_warned_once(tmp_path):
    store = open_store(str(tmp_path / "s"))
    for k in ("old-1", "old-2"):
        store.put(k, make_entry(seed=len(k)))
        _downgrade_local(store, k)
    got, ws = _store_warnings(lambda: [store.get("old-1"), store.get("old-2"), store.get("old-1")])
    assert got == [None, None, None]
    assert len(ws) == 1 and "format '1'" in ws[0]
    assert store.counters["stale"] == 2 and store.counters["bad"] == 2
    assert not store.contains("old-1") and not store.contains("old-2")
    assert list((store.root / "quarantine").iterdir()) == []  # removed, not kept as evidence
    store.put("old-1", make_entry(seed=5))  # re-encoded by the engine
    assert same_bits(store.get("old-1"), make_entry(seed=5))


def test_issue12_item5_old_format_redis_manifest_is_stale(redis_url):
    store = open_store(_redis_url(redis_url))
    store.put("old", make_entry(seed=1))
    man = json.loads(store.client.get(store.manifest_key("old")))
    man["format"] = 1
    store.client.set(store.manifest_key("old"), json.dumps(man))
    got, ws = _store_warnings(lambda: [store.get("old"), store.get("old")])
    assert got == [None, None] and len(ws) == 1 and "format 1" in ws[0]
    assert store.counters["stale"] == 1 and not store.contains("old")
    assert list(store.client.scan_iter(match=f"{store.prefix}:*")) == []  # chunks removed too


# -- item 6: Redis manifests are validated -----------------------------------------------------

@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"null", b"42", b"{}", b"{not json", b"\xff\xfe"])
def test_issue12_item6_manifest_not_an_object_is_a_bad_entry(redis_url, raw, capsys):
    url = _redis_url(redis_url)
    store = open_store(url)
    store.put("k", make_entry(seed=1))
    store.client.set(store.manifest_key("k"), raw)
    assert [b.key for b in store.verify()] == ["k"]  # listed, no exception
    assert store.list() == []
    rc = store_main(["store", "verify", "--store", url])
    err = capsys.readouterr()
    assert rc == 2 and "1 bad" in err.out and "Traceback" not in err.err
    got, ws = _store_warnings(lambda: [store.get("k"), store.get("k")])
    assert got == [None, None] and len(ws) == 1  # reported once, then gone
    assert store.counters["bad"] == 1
    store.put("k", make_entry(seed=1))
    assert same_bits(store.get("k"), make_entry(seed=1))


def test_issue12_item6_absurd_chunk_count_is_refused_at_once(redis_url):
    store = open_store(_redis_url(redis_url))
    store.put("k", make_entry(seed=1))
    man = json.loads(store.client.get(store.manifest_key("k")))
    man["n_chunks"] = 20_000_000
    store.client.set(store.manifest_key("k"), json.dumps(man))
    t0 = time.monotonic()
    got, ws = _store_warnings(lambda: store.get("k"))
    assert got is None and len(ws) == 1 and "n_chunks" in ws[0]
    assert store.verify() == [] and time.monotonic() - t0 < 30  # 93 s and a crash before


@pytest.mark.parametrize("field,value", [("nbytes", 10 ** 15), ("chunk_bytes", 0), ("tensors", {}),
                                         ("meta", []), ("n_layers", "3"), ("version", "../x"),
                                         ("tensors", [["L0.k", "float32", [-1], 0, 4]])])
def test_issue12_item6_manifest_fields_are_type_and_bound_checked(redis_url, field, value):
    store = open_store(_redis_url(redis_url))
    store.put("k", make_entry(seed=1))
    man = json.loads(store.client.get(store.manifest_key("k")))
    man[field] = value
    store.client.set(store.manifest_key("k"), json.dumps(man))
    assert [b.key for b in store.verify()] == ["k"]
    got, ws = _store_warnings(lambda: store.get("k"))
    assert got is None and len(ws) == 1


@pytest.mark.parametrize("wrong", ["list", "hash"])
def test_issue12_item6_manifest_of_wrong_redis_type_heals(redis_url, wrong):
    store = open_store(_redis_url(redis_url))
    m = store.manifest_key("k")
    if wrong == "list":
        store.client.rpush(m, "x")
    else:
        store.client.hset(m, "f", "v")
    got, ws = _store_warnings(lambda: store.get("k"))
    assert got is None and len(ws) == 1 and "Redis type" in ws[0]
    assert store.counters["bad"] == 1
    ok, ws = _store_warnings(lambda: store.put("k", make_entry(seed=1)))
    assert ok and ws == []
    got, ws = _store_warnings(lambda: store.get("k"))
    assert same_bits(got, make_entry(seed=1)) and ws == []


def test_issue12_item6_put_over_wrong_redis_type_heals(redis_url):
    store = open_store(_redis_url(redis_url))
    store.client.rpush(store.manifest_key("k"), "x")
    ok, ws = _store_warnings(lambda: store.put("k", make_entry(seed=1)))
    assert ok and ws == []
    assert same_bits(store.get("k"), make_entry(seed=1))


# -- item 7: a hung Redis server ---------------------------------------------------------------

class HungServer:
    """A loopback TCP server that accepts connections and never answers (like a hung redis)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)  # held open, never read, never answered
            except (socket.timeout, OSError):
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def hung():
    server = HungServer()
    yield server
    server.close()


def test_issue12_item7_timeout_default_and_option(hung):
    from promptcache.store.redis_store import DEFAULT_TIMEOUT_S
    store = open_store(f"redis://127.0.0.1:{hung.port}/0")
    kw = store.client.connection_pool.connection_kwargs
    assert store.timeout == DEFAULT_TIMEOUT_S <= 10
    assert kw["socket_timeout"] == kw["socket_connect_timeout"] == DEFAULT_TIMEOUT_S
    store = open_store(f"redis://127.0.0.1:{hung.port}/0?timeout=0.25")
    kw = store.client.connection_pool.connection_kwargs
    assert store.timeout == kw["socket_timeout"] == 0.25
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(StoreError, match="timeout"):
            open_store(f"redis://127.0.0.1:{hung.port}/0?timeout={bad}")


def test_issue12_item7_hung_redis_is_a_quick_miss(hung):
    store = open_store(f"redis://127.0.0.1:{hung.port}/0?timeout=0.5&retry_after=0")
    t0 = time.monotonic()
    got, ws = _store_warnings(lambda: store.get("k"))
    first = time.monotonic() - t0
    assert got is None and len(ws) == 1 and "unreachable" in ws[0]
    ok, _ = _store_warnings(lambda: store.put("k", make_entry()))
    assert ok is False
    # Generous bound (not a timing test): 0.5 s timeouts, no retry of a timeout; 120 s before.
    assert first < 15 and time.monotonic() - t0 < 30


def test_issue12_item7_add_schema_fails_over_to_encoding(hung):
    ref = make_cache("llama", "scaffold")
    ref.add_schema(FULL_SCHEMA)
    t0 = time.monotonic()
    pc = make_cache("llama", "scaffold", store=f"redis://127.0.0.1:{hung.port}/0?timeout=0.5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        rep = pc.add_schema(FULL_SCHEMA)
    assert rep.encoded_segments == rep.segments and time.monotonic() - t0 < 30
    prompt = next(iter(FULL_PROMPTS.values()))
    assert (pc.next_token_logits(prompt) - ref.next_token_logits(prompt)).abs().max() < 1e-5


# -- item 9: FIFOs and devices at entry paths --------------------------------------------------

_FIFO_CHILD = r"""
import os, sys, warnings
from promptcache.store import StoreWarning, open_store
from store_helpers import make_entry, same_bits
store = open_store(sys.argv[1])
store.put("ok", make_entry(seed=1))
path = store.entry_path("k")
path.parent.mkdir(parents=True, exist_ok=True)
os.mkfifo(path)
print("list", sorted(i.key for i in store.list()), flush=True)
bad = store.verify()
print("verify", [b.key for b in bad], "regular file" in bad[0].reason, flush=True)
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter("always")
    got = store.get("k")
ws = [str(w.message) for w in ws if issubclass(w.category, StoreWarning)]
print("get", got is None, len(ws), "regular file" in ws[0], path.exists(), flush=True)
print("ok", same_bits(store.get("ok"), make_entry(seed=1)), flush=True)
"""


def test_issue12_item9_fifo_at_entry_path_is_a_bad_entry(tmp_path):
    """In a child process with a timeout: a read blocked on a FIFO (safetensors may hold the GIL
    while it waits) fails this test instead of hanging pytest."""
    try:
        out = _run_child(_FIFO_CHILD, str(tmp_path / "s"), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a store call blocked on a FIFO at an entry path")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["list ['ok']", "verify ['k'] True", "get True 1 True False",
                                       "ok True"]


def test_issue12_item9_device_at_entry_path_is_a_bad_entry(tmp_path):
    store = open_store(str(tmp_path / "s"))
    path = store.entry_path("k")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/dev/zero")
    got, ws = _store_warnings(lambda: store.get("k"))
    assert got is None and len(ws) == 1 and "regular file" in ws[0]


def test_issue12_item9_file_larger_than_declared_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(local_mod, "MAX_HEADER_BYTES", 64)
    store = open_store(str(tmp_path / "s"))
    store.put("k", make_entry(seed=1))
    got, ws = _store_warnings(lambda: store.get("k"))
    assert got is None and "declared" in ws[0]


# -- item 15: read-only stores and bad sizes in the CLI ----------------------------------------

def _fill(url: str, n: int = 3) -> None:
    store = open_store(url)
    for i in range(n):
        store.put(f"k{i}", make_entry(seed=i))
    store.close()


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = store_main(["store", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_issue12_item15_rm_and_gc_on_unwritable_store_exit_2(tmp_path, capsys, monkeypatch):
    """Simulated in-process: every unlink/rename in the directory store raises EACCES."""
    url = str(tmp_path / "s")
    _fill(url)
    store = open_store(url)
    header, data = _read_header(store.entry_path("k0"))
    _write_header(store.entry_path("k0"), header, data[:-4] + b"\0\0\0\0")  # one bad entry for gc
    old = time.time() - 7200
    leftover = store.entry_path("k1").parent / ".k1.1.x.tmp"
    leftover.write_bytes(b"crashed writer")
    os.utime(leftover, (old, old))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))
    monkeypatch.setattr(local_mod.os, "unlink", denied)
    monkeypatch.setattr(local_mod.os, "replace", denied)
    monkeypatch.setattr(Path, "unlink", denied)
    rc, out, err = _cli(capsys, "rm", "--all", "--store", url)
    assert rc == 2 and "Permission denied" in _one_error_line(err) and "removed 0 entries" in out
    rc, out, err = _cli(capsys, "gc", "--store", url)
    assert rc == 2 and "Permission denied" in _one_error_line(err)
    assert "could not remove bad entry k0" in out
    rc, out, err = _cli(capsys, "gc", "--store", url, "--max-bytes", "0")
    assert rc == 2 and _one_error_line(err)
    monkeypatch.undo()
    assert sorted(i.key for i in open_store(url).list()) == ["k0", "k1", "k2"] and leftover.exists()
    rc, out, err = _cli(capsys, "gc", "--store", url, "--max-bytes", "0")  # writable again
    assert rc == 0 and "removed bad entry k0" in out and "1 leftovers removed, 2 evicted" in out


def _drop_dac_override() -> list[str] | None:
    """A command prefix that runs a child without the power to ignore file permissions.

    Tests run as root, and root writes to ``chmod a-w`` directories. Without
    CAP_DAC_OVERRIDE/CAP_FOWNER (``setpriv`` drops them from the bounding set) root is held to
    the owner's permission bits like any user. Not root: ``chmod`` alone suffices.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    probe = subprocess.run([setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner",
                            "true"], capture_output=True)
    return None if probe.returncode else [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def test_issue12_item15_real_read_only_directory_store(tmp_path):
    prefix = _drop_dac_override()
    if prefix is None:
        pytest.skip("running as root without setpriv (or it may not drop capabilities here)")
    root = tmp_path / "ro"
    _fill(str(root))
    victim = open_store(str(root)).entry_path("k0")
    header, data = _read_header(victim)
    _write_header(victim, header, data[:-4] + b"\0\0\0\0")  # now bad: gc wants to quarantine it
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chmod(os.path.join(dirpath, name), 0o555 if name in dirnames else 0o444)
    os.chmod(root, 0o555)
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    try:
        for argv in (["rm", "--all"], ["gc"], ["gc", "--max-bytes", "0"]):
            out = subprocess.run([*prefix, sys.executable, "-m", "promptcache.store.cli", "store", *argv,
                                  "--store", str(root)], capture_output=True, text=True, env=env,
                                 timeout=120)
            assert out.returncode == 2, (argv, out.stdout, out.stderr)
            line = _one_error_line(out.stderr)
            assert "Permission denied" in line or "Read-only" in line, line
        assert sorted(p.name for p in root.glob("entries/*/*.safetensors")) == \
            ["k0.safetensors", "k1.safetensors", "k2.safetensors"]
    finally:
        for dirpath, dirnames, _ in os.walk(root):
            os.chmod(dirpath, 0o755)


def test_issue12_item15_read_only_redis_replica(redis_server, capsys):
    url = _redis_url(redis_server.url)
    _fill(url)
    import redis
    r = redis.Redis(port=redis_server.port)
    r.replicaof("127.0.0.1", free_port())  # a replica of nothing: keeps its data, refuses writes
    try:
        rc, out, err = _cli(capsys, "rm", "--all", "--store", url)
        assert rc == 2 and "read only replica" in _one_error_line(err) and "removed 0 entries" in out
        rc, out, err = _cli(capsys, "gc", "--store", url, "--max-bytes", "0")
        assert rc == 2 and "read only replica" in _one_error_line(err)
        rc, out, err = _cli(capsys, "verify", "--store", url)
        assert rc == 0 and "3 entries checked, 0 bad" in out  # reading still works
    finally:
        r.replicaof("NO", "ONE")


@pytest.mark.parametrize("size", ["-5", "-1G", "inf", "nan", "1e999", "5 X"])
def test_issue12_item15_gc_refuses_bad_max_bytes(tmp_path, capsys, size):
    url = str(tmp_path / "s")
    _fill(url, 1)
    with pytest.raises(SystemExit) as exc:
        store_main(["store", "gc", "--store", url, f"--max-bytes={size}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "not a size" in err and "Traceback" not in err
    assert [i.key for i in open_store(url).list()] == ["k0"]  # nothing evicted
