"""FileStorage: the conformance suite, atomic replacement across processes, keys and URLs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import funcpipe
from funcpipe.errors import ConfigError, StorageError
from funcpipe.storage import FileStorage
from funcpipe.storage.file import TEMP_MARKER


def test_keys_map_to_files(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.put("a/b/c", b"abc")
    assert (tmp_path / "a" / "b" / "c").read_bytes() == b"abc"
    assert storage.root == tmp_path


def test_put_leaves_no_temporary_file(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.put("a/k", b"1")
    storage.put("a/k", b"2")
    assert sorted(os.listdir(tmp_path / "a")) == ["k"]


def test_delete_prunes_empty_directories_but_not_the_root(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "root")
    storage.put("a/b/c/1", b"1")
    storage.put("a/b/d/2", b"2")
    storage.put("a/e", b"3")
    storage.delete(["a/b/c/1", "a/b/d/2"])
    assert sorted(os.listdir(tmp_path / "root" / "a")) == ["e"]
    storage.delete(["a/e"])
    assert os.listdir(tmp_path / "root") == []


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "a//b", "a/", "..", "a/../b", "../escape", ".", "a/./b", "nul\0byte", f"a/b{TEMP_MARKER}1"],
)
def test_invalid_keys_are_rejected(tmp_path: Path, key: str) -> None:
    storage = FileStorage(tmp_path / "store")
    for operation in (
        lambda: storage.put(key, b"x"),
        lambda: storage.get(key),
        lambda: storage.get_if_exists(key),
        lambda: storage.exists(key),
        lambda: storage.delete([key]),
    ):
        with pytest.raises(ConfigError) as info:
            operation()
        assert repr(key) in str(info.value)
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("prefix", ["/a", "../", "a/../", "a//", "./"])
def test_invalid_prefixes_are_rejected(tmp_path: Path, prefix: str) -> None:
    with pytest.raises(ConfigError, match="prefix"):
        FileStorage(tmp_path).list(prefix)


def test_delete_rejects_a_single_string(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="iterable"):
        FileStorage(tmp_path).delete("a/b")


def test_list_skips_temporary_files(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.put("a/b", b"1")
    # What a writer that died between write and rename leaves behind.
    (tmp_path / "a" / f"b{TEMP_MARKER}dead-1-0").write_bytes(b"partial")
    (tmp_path / "a" / f"c{TEMP_MARKER}dead-1-1").write_bytes(b"partial")
    (tmp_path / f"top{TEMP_MARKER}dead-1-2").write_bytes(b"partial")
    assert storage.list("") == ["a/b"]
    assert storage.list("a/") == ["a/b"]
    assert storage.list("a/c") == []
    assert storage.list("to") == []


def test_key_and_directory_of_keys_conflict(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.put("a/b", b"1")
    with pytest.raises(StorageError, match="'a/b/c'"):
        storage.put("a/b/c", b"2")
    with pytest.raises(StorageError, match="'a'"):
        storage.put("a", b"3")
    assert storage.get_if_exists("a") is None  # a directory is not an object
    assert not storage.exists("a")
    assert storage.get_if_exists("a/b/c") is None
    storage.delete(["a", "a/b/c"])  # neither is an object: ignored
    assert storage.list("") == ["a/b"]


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigError, match="file"):
        FileStorage(tmp_path / "file")


def test_relative_root_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = FileStorage("rel")
    assert storage.root == tmp_path / "rel"
    assert storage.url == (tmp_path / "rel").as_uri()


# -- URLs ------------------------------------------------------------------------


def test_url_roundtrip(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "with space")
    assert storage.url == f"file://{tmp_path}/with%20space"
    reopened = FileStorage.from_url(storage.url)
    assert reopened.root == tmp_path / "with space"
    assert reopened.url == storage.url


def test_url_forms(tmp_path: Path) -> None:
    assert FileStorage.from_url(f"file://{tmp_path}").root == tmp_path
    assert FileStorage.from_url(f"file://localhost{tmp_path}").root == tmp_path
    assert FileStorage.from_url(f"file:{tmp_path}").root == tmp_path
    assert FileStorage.from_url(f"FILE://{tmp_path}/").root == tmp_path


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("file://relative/path", "absolute"),
        ("file:relative", "absolute"),
        ("file://", "absolute"),
        ("file:///tmp/x?mode=1", "query"),
        ("file:///tmp/x#frag", "query or fragment"),
        ("memory://x", "not a file URL"),
    ],
)
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        FileStorage.from_url(url)
    assert url in str(info.value)


# -- atomicity across processes ------------------------------------------------------

_READER = textwrap.dedent(
    """
    import sys
    from funcpipe.storage import FileStorage

    storage = FileStorage(sys.argv[1])
    size = int(sys.argv[2])
    good = (b"A" * size, b"B" * size)
    reads = bad = 0
    while True:
        stop = storage.get_if_exists("stop")
        data = storage.get("obj")  # never missing: os.replace swaps atomically
        reads += 1
        if data not in good:
            bad += 1
        if reads == 1:
            storage.put("reader-ready", b"")
        if stop is not None:
            break
    print(reads, bad)
    """
)


def test_readers_in_other_processes_never_see_partial_objects(tmp_path: Path) -> None:
    size = 2**20
    payloads = (b"A" * size, b"B" * size)
    storage = FileStorage(tmp_path)
    storage.put("obj", payloads[0])
    src = str(Path(funcpipe.__file__).parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(tmp_path), str(size)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        storage.wait("reader-ready", timeout=120)
        for i in range(200):
            storage.put("obj", payloads[i % 2])
        storage.put("stop", b"")
        out, err = reader.communicate(timeout=120)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.communicate()
    assert reader.returncode == 0, err
    reads, bad = map(int, out.split())
    assert reads >= 2
    assert bad == 0


def test_create_writes_whole_or_not_at_all_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    assert storage.create("a/lease", b"first") is True
    assert storage.create("a/lease", b"second") is False
    assert sorted(os.listdir(tmp_path / "a")) == ["lease"]
    assert (tmp_path / "a" / "lease").read_bytes() == b"first"
    assert os.stat(tmp_path / "a" / "lease").st_nlink == 1  # the temporary's name is gone


def test_create_over_a_directory_of_keys_is_a_storage_error_and_leaves_nothing(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.put("a/b", b"1")
    with pytest.raises(StorageError, match="cannot store key 'a'"):
        storage.create("a", b"2")
    assert sorted(os.listdir(tmp_path)) == ["a"] and sorted(os.listdir(tmp_path / "a")) == ["b"]


def test_creates_racing_from_processes_leave_one_winner(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from funcpipe.storage import FileStorage
        storage = FileStorage(sys.argv[1])
        print("ready", flush=True)
        sys.stdin.readline()  # go
        print(int(storage.create("lease", sys.argv[2].encode())), flush=True)
        """
    )
    src = str(Path(funcpipe.__file__).parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    racers = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), f"racer {n}"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
        for n in range(4)
    ]
    try:
        for racer in racers:  # every racer has opened the storage before any is told to go
            assert racer.stdout is not None and racer.stdout.readline() == "ready\n"
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        outcomes = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.communicate()
    assert sorted(outcomes) == ["0", "0", "0", "1"]
    assert FileStorage(tmp_path).get("lease") == f"racer {outcomes.index('1')}".encode()
    assert os.listdir(tmp_path) == ["lease"]
