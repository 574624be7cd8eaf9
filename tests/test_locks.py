"""One file lock (embbench._utils.hold_lock) with one holder format, for cells and cache splits."""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from embbench._utils import hold_lock, lock_holder
from embbench.cache import EmbeddingCache
from embbench.cache_integrity import CacheBusyError

HOLDER_KEYS = {"pid", "host", "command", "since"}


@contextmanager
def _held_elsewhere(enter):
    """Hold a lock in another thread (a second FileLock, as another process would) meanwhile."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with enter():
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(10)
    try:
        yield
    finally:
        release.set()
        t.join()


def test_a_busy_cell_lock_names_pid_host_and_command(tmp_path, caplog):
    lock = tmp_path / "cell.json.lock"
    with _held_elsewhere(lambda: hold_lock(lock, "cell A")):
        holder = lock_holder(lock)
        assert set(holder) == HOLDER_KEYS and holder["pid"] == os.getpid()
        assert holder["command"]
        with (
            caplog.at_level(logging.WARNING, logger="embbench._utils"),
            pytest.raises(TimeoutError) as err,
            hold_lock(lock, "cell A", timeout=0.3, notify_after=0.1),
        ):
            pass
    who = f"pid {os.getpid()} on host {socket.gethostname()} ({holder['command']}, since"
    assert who in str(err.value)
    assert any(
        "waiting" in r.message and "cell A" in r.message and who in r.message
        for r in caplog.records
    )
    assert lock_holder(lock) == {}  # released: the holder file is gone
    with hold_lock(lock, "cell A", timeout=0):  # and the lock is free again
        pass


def test_the_cache_split_lock_is_the_same_lock_with_the_same_holder(tmp_path):
    cache = EmbeddingCache("d", "m", "test", {"x": 1}, root=tmp_path)
    with _held_elsewhere(cache.lock):
        assert set(cache.holder()) == HOLDER_KEYS
        assert cache.holder() == lock_holder(Path(cache.lock_path))
        busy = rf"pid {os.getpid()} on host {socket.gethostname()} \(.+, since"
        with pytest.raises(CacheBusyError, match=busy), cache.lock(timeout=0.2):
            pass
