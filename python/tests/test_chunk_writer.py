"""kvfs.vllm.ChunkWriter, the connector's store thread, without an engine: it stores what it
is given in order, drains on request, logs a failed store and goes on, and bounds its backlog
(a step that would exceed the bound waits until the writer has caught up).

Needs the vLLM venv (kvfs.vllm imports vLLM; KVFS_REQUIRE name `vllm`)."""

from __future__ import annotations

import threading

import pytest

from conftest import need

try:
    import kvfs.vllm as kv

    HAVE_VLLM, WHY = True, ""
except ImportError as e:  # no vLLM in this interpreter
    HAVE_VLLM, WHY = False, f"kvfs.vllm does not import: {e}"


class Snap:
    def __init__(self, name: str, size: int) -> None:
        self.name, self.bytes = name, size


class SlowLoader:
    """Stores a snapshot once `release` is set for it; records the order."""

    def __init__(self) -> None:
        self.stored: list[str] = []
        self.release: dict[str, threading.Event] = {}

    def gate(self, name: str) -> threading.Event:
        return self.release.setdefault(name, threading.Event())

    def store_snapshot(self, snap: Snap) -> dict:
        assert self.gate(snap.name).wait(10), f"{snap.name} never released"
        if snap.name == "bad":
            raise kv.KvfsError("disk full")
        self.stored.append(snap.name)
        return {"written": 1, "present": 0, "bytes_written": snap.bytes}


@pytest.fixture(autouse=True)
def _vllm() -> None:
    need("vllm", HAVE_VLLM, WHY)


def test_stores_in_order_and_drains() -> None:
    loader, w = SlowLoader(), kv.ChunkWriter(1 << 20)
    for name in ["a", "bad", "b"]:
        loader.gate(name).set()
        w.put(loader, Snap(name, 10), name)
    w.drain()
    # the failed store is logged, and the next one still runs
    assert loader.stored == ["a", "b"]
    assert w.backlog_bytes == 0


def test_a_full_backlog_makes_put_wait_for_the_writer() -> None:
    loader, w = SlowLoader(), kv.ChunkWriter(100)
    w.put(loader, Snap("a", 60), "a")  # being written, held by its gate
    done = threading.Event()

    def second() -> None:
        w.put(loader, Snap("b", 60), "b")  # 120 > 100: waits for "a"
        done.set()

    t = threading.Thread(target=second)
    t.start()
    assert not done.wait(0.3), "put returned with 120 bytes queued against a bound of 100"
    assert w.backlog_bytes == 60
    loader.gate("a").set()
    assert done.wait(10), "put still waits after the writer caught up"
    t.join()
    loader.gate("b").set()
    w.drain()
    assert loader.stored == ["a", "b"]
    # a snapshot larger than the bound on its own goes through once the queue is empty
    loader.gate("big").set()
    w.put(loader, Snap("big", 500), "big")
    w.drain()
    assert loader.stored == ["a", "b", "big"]
