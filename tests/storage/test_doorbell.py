"""Doorbells: a put on one host ends the pause of a thread that waits on the same FileStorage root."""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from funcpipe.storage import FileStorage
from funcpipe.storage.base import SLEEP
from funcpipe.storage.doorbell import Doorbell, directory_for, doorbell_for

needs_unix_datagrams = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets")
pytestmark = needs_unix_datagrams

#: Long enough never to end a pause in a passing test: a ring that is lost fails it by the value.
NEVER_S = 30.0


@pytest.fixture
def bells() -> Iterator[str]:
    """A directory for sockets, its path short enough for them (pytest's tmp_path may not be)."""
    directory = tempfile.mkdtemp(prefix="fp-bells-", dir="/tmp" if os.path.isdir("/tmp") else None)
    yield os.path.join(directory, "bells")
    shutil.rmtree(directory, ignore_errors=True)


def test_a_ring_after_arm_ends_the_next_pause(bells: str) -> None:
    bell = Doorbell(bells)
    pause = bell.pause()
    pause.arm()
    bell.ring()
    assert pause.pause(NEVER_S) is True


def test_arm_drops_the_rings_from_before_it(bells: str) -> None:
    bell = Doorbell(bells)
    pause = bell.pause()
    bell.ring()
    bell.ring()
    pause.arm()
    assert pause.pause(0.0) is False


def test_a_pause_nobody_rings_runs_out(bells: str) -> None:
    pause = Doorbell(bells).pause()
    pause.arm()
    assert pause.pause(0.001) is False


def test_each_thread_has_its_own_pause_and_a_ring_wakes_them_all(bells: str) -> None:
    bell = Doorbell(bells)
    armed = threading.Barrier(3)
    woken: list[bool] = []

    def waiter() -> None:
        pause = bell.pause()
        pause.arm()
        armed.wait(NEVER_S)
        woken.append(pause.pause(NEVER_S))

    threads = [threading.Thread(target=waiter) for _ in range(2)]
    for thread in threads:
        thread.start()
    armed.wait(NEVER_S)  # both bound and armed
    assert len(os.listdir(bell.directory)) == 2
    bell.ring()
    for thread in threads:
        thread.join()
    assert woken == [True, True]


def test_a_thread_that_ends_unbinds_its_socket(bells: str) -> None:
    bell = Doorbell(bells)
    thread = threading.Thread(target=bell.pause)
    thread.start()
    thread.join()
    gc.collect()
    assert os.listdir(bell.directory) == []


def test_a_ring_removes_the_socket_of_a_process_that_died(bells: str) -> None:
    bell = Doorbell(bells)
    os.makedirs(bell.directory)
    dead = os.path.join(bell.directory, "12345-1-0-deadbeef")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(dead)
    sock.close()  # the file stays, as a killed process leaves it
    bell.ring()
    assert not os.path.exists(dead)


def test_a_socket_path_too_long_for_unix_sockets_falls_back_to_sleeping(tmp_path: Path) -> None:
    bell = Doorbell(str(tmp_path / ("d" * 120)))
    assert not bell.enabled
    assert bell.pause() is SLEEP
    bell.ring()  # nothing to do, no error


def test_one_root_one_directory_whatever_the_spelling(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "root")
    assert directory_for(str(tmp_path / "root")) == directory_for(str(tmp_path / "link"))
    assert directory_for(str(tmp_path / "root")) == directory_for(str(tmp_path / "root") + "/")
    assert directory_for(str(tmp_path / "root")) != directory_for(str(tmp_path / "other"))
    assert doorbell_for(str(tmp_path / "root")) is doorbell_for(str(tmp_path / "link"))


def test_a_put_rings_a_waiter_of_another_storage_on_the_same_root(tmp_path: Path) -> None:
    waiter, writer = FileStorage(tmp_path), FileStorage(tmp_path)
    pause = waiter.pause_for_wait()
    pause.arm()
    writer.put("a/k", b"x")
    assert pause.pause(NEVER_S) is True


def test_a_put_in_another_process_rings_this_one(tmp_path: Path) -> None:
    pause = FileStorage(tmp_path).pause_for_wait()
    pause.arm()
    code = textwrap.dedent(
        f"""
        from funcpipe.storage import FileStorage
        FileStorage({str(tmp_path)!r}).put("a/k", b"x")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert pause.pause(NEVER_S) is True


def test_a_put_on_another_root_does_not_ring(tmp_path: Path) -> None:
    pause = FileStorage(tmp_path / "one").pause_for_wait()
    pause.arm()
    FileStorage(tmp_path / "two").put("a/k", b"x")
    assert pause.pause(0.0) is False
