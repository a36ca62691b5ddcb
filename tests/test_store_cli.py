"""`promptcache store ls|stats|verify|rm|gc`: output and exit codes, on a directory and on Redis."""

from __future__ import annotations

import argparse
import time
import uuid

import pytest

from promptcache.store import make_key, open_store
from promptcache.store.cli import add_store_subcommands, main, parse_bytes

try:
    from store_helpers import make_entry
    from redis_fixture import redis_url  # noqa: F401  (pytest fixture)
except ImportError:  # tests/ imported as a package
    from tests.store_helpers import make_entry
    from tests.redis_fixture import redis_url  # noqa: F401


@pytest.fixture(params=["local", "redis"])
def url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('redis_url')}?prefix=cli{uuid.uuid4().hex[:8]}"


def _fill(url: str) -> list[str]:
    store = open_store(url)
    keys = []
    for i in range(3):
        key = make_key({"module": i})
        store.put(key, make_entry(seq=100 * (i + 1), seed=i, meta={"module": f"doc{i}"}))
        keys.append(key)
        time.sleep(0.01)  # distinct access times for LRU
    return keys


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["store", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_ls_stats_verify(url, capsys):
    keys = _fill(url)
    rc, out, _ = run(capsys, "ls", "--store", url)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["KEY", "LAYERS", "TOKENS", "DTYPE"]
    assert lines[1].startswith(keys[2][:16]) and "doc2" in lines[1] and "300" in lines[1]  # newest first
    assert "3 entries" in lines[-1]
    rc, out, _ = run(capsys, "ls", "--store", url, "--sort", "size", "--json")
    assert rc == 0 and '"module": "doc2"' in out
    rc, out, _ = run(capsys, "stats", "--store", url)
    assert rc == 0 and "entries" in out and " 3" in out
    rc, out, _ = run(capsys, "verify", "--store", url)
    assert rc == 0 and "3 entries checked, 0 bad" in out


def test_verify_fails_on_bad_entry_and_gc_removes_it(tmp_path, capsys):
    url = str(tmp_path / "s")
    keys = _fill(url)
    store = open_store(url)
    path = store.entry_path(keys[0])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    rc, out, _ = run(capsys, "verify", "--store", url)
    assert rc == 2 and keys[0] in out and "checksum" in out and "1 bad" in out
    rc, out, _ = run(capsys, "gc", "--store", url, "--dry-run")
    assert rc == 0 and "would remove" in out and path.exists()
    rc, out, _ = run(capsys, "gc", "--store", url)
    assert rc == 0 and f"removed bad entry {keys[0]}" in out
    rc, out, _ = run(capsys, "verify", "--store", url)
    assert rc == 0 and "2 entries checked, 0 bad" in out


def test_gc_evicts_least_recently_used(url, capsys):
    keys = _fill(url)  # sizes: doc0 < doc1 < doc2; access order 0, 1, 2
    store = open_store(url)
    time.sleep(0.01)
    store.get(keys[0])  # doc0 becomes the most recently used
    sizes = {i.key: i.nbytes for i in store.list()}
    budget = sizes[keys[0]] + sizes[keys[2]]
    rc, out, _ = run(capsys, "gc", "--store", url, "--max-bytes", str(budget))
    assert rc == 0 and "1 evicted" in out and keys[1][:16] in out
    assert {i.key for i in store.list()} == {keys[0], keys[2]}
    rc, out, _ = run(capsys, "gc", "--store", url, "--max-bytes", "0")
    assert rc == 0 and store.list() == []


def test_rm(url, capsys):
    keys = _fill(url)
    rc, out, _ = run(capsys, "rm", "--store", url, keys[0][:10])  # unique prefix
    assert rc == 0 and "removed 1 entry" in out
    rc, _, err = run(capsys, "rm", "--store", url, keys[0])
    assert rc == 2 and "not found" in err
    rc, _, err = run(capsys, "rm", "--store", url, keys[1][:3])
    assert rc == 2 and "too short" in err
    rc, _, err = run(capsys, "rm", "--store", url)
    assert rc == 2
    rc, out, _ = run(capsys, "rm", "--store", url, "--all")
    assert rc == 0 and "removed 2 entries" in out
    assert open_store(url).list() == []


def test_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PROMPTCACHE_STORE", raising=False)
    rc, _, err = run(capsys, "ls")
    assert rc == 2 and "no store given" in err
    rc, _, err = run(capsys, "ls", "--store", "redis://127.0.0.1:1/0")
    assert rc == 2 and "unreachable" in err
    rc, _, err = run(capsys, "stats", "--store", "nope://x")
    assert rc == 2 and "unknown store scheme" in err
    rc, _, err = run(capsys, "ls", "--store", str(tmp_path / "typo"))
    assert rc == 2 and "no promptcache store" in err and not (tmp_path / "typo").exists()
    with pytest.raises(SystemExit) as exc:
        main(["store", "gc", "--store", "memory://", "--max-bytes", "lots"])
    assert exc.value.code == 2


def test_store_from_environment(tmp_path, capsys, monkeypatch):
    url = str(tmp_path / "env")
    _fill(url)
    monkeypatch.setenv("PROMPTCACHE_STORE", url)
    parser = argparse.ArgumentParser(prog="promptcache")
    add_store_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["store", "verify"])
    assert args.func(args) == 0
    assert "3 entries checked" in capsys.readouterr().out


def test_parse_bytes():
    assert parse_bytes("512") == 512
    assert parse_bytes("4K") == 4096
    assert parse_bytes("1.5G") == int(1.5 * 1024 ** 3)
    assert parse_bytes("20 GiB") == 20 * 1024 ** 3
    for bad in ("", "G", "12X", "1..2M"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_bytes(bad)
