"""KeyLocks hold across processes on one index (PostgreSQL advisory lock, SQLite file lock): a key held by
another process is not granted until it lets go or dies; other keys are not held up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest

from dicomflow.engine.keylock import KeyLocks
from dicomflow.index.sql import SqlIndexStore

ROOT = Path(__file__).parents[2]
HOLDER = """
import asyncio, sys
from dicomflow.engine.keylock import KeyLocks
from dicomflow.index.sql import SqlIndexStore

async def main():
    index = await SqlIndexStore.open(sys.argv[1])
    locks = KeyLocks(index)
    held = locks.hold(sys.argv[2])
    try:
        async with asyncio.timeout(20):
            await held.__aenter__()
    except TimeoutError:
        print("not granted", flush=True)
        return
    print("held", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await held.__aexit__(None, None, None)
    print("released", flush=True)
    locks.close()
    await index.close()

asyncio.run(main())
"""


@contextmanager
def holder(index_url: str, key: str) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``key`` until a line arrives on its stdin."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, index_url, key], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "held"  # within its 20 s (else "not granted")
        yield process
    finally:
        process.kill()
        process.wait(10)


async def _granted_within(locks: KeyLocks, key: str, seconds: float) -> float | None:
    """Seconds until ``key`` was granted, or None if it was not within ``seconds``."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(seconds):
            async with locks.hold(key):
                return time.monotonic() - started
    except TimeoutError:
        return None


async def test_a_key_held_by_another_process_waits_until_released(index: SqlIndexStore, index_url: str) -> None:
    locks = KeyLocks(index)
    try:
        with holder(index_url, "fhir Patient?urn:x|1") as other:
            assert await _granted_within(locks, "fhir Patient?urn:x|1", 0.5) is None
            assert await _granted_within(locks, "fhir Patient?urn:x|2", 5.0) is not None  # another key: no wait
            waiting = asyncio.create_task(_granted_within(locks, "fhir Patient?urn:x|1", 30.0))
            await asyncio.sleep(0.2)
            assert not waiting.done()
            assert other.stdin is not None and other.stdout is not None
            other.stdin.write("\n")
            other.stdin.flush()
            assert await waiting is not None
            assert other.stdout.readline().strip() == "released"
    finally:
        locks.close()


async def test_a_crashed_holder_lets_go(index: SqlIndexStore, index_url: str) -> None:
    locks = KeyLocks(index)
    try:
        with holder(index_url, "fhir Patient?urn:x|3") as other:
            assert await _granted_within(locks, "fhir Patient?urn:x|3", 0.5) is None
            other.kill()  # kill -9: no unlock, no rollback; its connection (or file) goes with it
            other.wait(10)
            assert await _granted_within(locks, "fhir Patient?urn:x|3", 30.0) is not None
    finally:
        locks.close()


async def test_waiters_in_one_process_take_turns(index: SqlIndexStore) -> None:
    locks = KeyLocks(index)
    inside, most = 0, 0

    async def one() -> None:
        nonlocal inside, most
        async with locks.hold("fhir Patient?urn:x|4"):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    try:
        await asyncio.gather(*(one() for _ in range(20)))
    finally:
        locks.close()
    assert most == 1


@pytest.mark.parametrize("body_fails", [False, True])
async def test_released_when_the_body_raises_or_returns(index: SqlIndexStore, index_url: str,
                                                        body_fails: bool) -> None:
    locks = KeyLocks(index)
    try:
        with pytest.raises(RuntimeError) if body_fails else nullcontext():
            async with locks.hold("fhir Patient?urn:x|5"):
                if body_fails:
                    raise RuntimeError("FHIR server said no")
        with holder(index_url, "fhir Patient?urn:x|5"):  # another process gets it
            pass
    finally:
        locks.close()
