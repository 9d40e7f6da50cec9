"""LoopStream: an async iterator of the event loop consumed from another thread, bounded and closable."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from dicomflow.dimse.qr import LoopStream
from dicomflow.errors import OutOfResourcesError


class _Ctx:
    """The part of DimseContext LoopStream uses: a loop in a thread of its own and ``run``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout or 10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def ctx() -> Iterator[_Ctx]:
    c = _Ctx()
    yield c
    c.stop()


class _Source:
    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.produced = 0
        self.closed = False

    def __aiter__(self) -> AsyncIterator[int]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[int]:
        try:
            for i in range(self.n):
                if i == self.fail_at:
                    raise OutOfResourcesError("index went away")
                self.produced += 1
                yield i
        finally:
            self.closed = True


def test_streams_everything_in_order(ctx: _Ctx) -> None:
    source = _Source(1000)
    assert list(LoopStream(ctx, lambda: aiter(source), prefetch=16, stall_timeout=10)) == list(range(1000))
    assert source.closed


def test_producer_stays_a_bounded_distance_ahead(ctx: _Ctx) -> None:
    source = _Source(10_000)
    stream = LoopStream(ctx, lambda: aiter(source), prefetch=8, stall_timeout=10)
    it = iter(stream)
    assert next(it) == 0
    ctx.run(asyncio.sleep(0.2))  # give the producer every chance to run ahead
    assert source.produced <= 1 + 8 + 8 + 1  # one batch taken, one queue full, one item in flight
    stream.close()
    assert source.closed  # the source is closed when the consumer stops early (C-CANCEL)


def test_errors_reach_the_consumer(ctx: _Ctx) -> None:
    source = _Source(100, fail_at=40)
    got: list[int] = []
    with pytest.raises(OutOfResourcesError):
        for item in LoopStream(ctx, lambda: aiter(source), stall_timeout=10):
            got.append(item)
    assert got == list(range(40))
    assert source.closed


def test_a_consumer_that_stops_taking_releases_the_source(ctx: _Ctx) -> None:
    """A peer that does not read its responses must not hold a database cursor forever."""
    source = _Source(10_000)
    stream = LoopStream(ctx, lambda: aiter(source), prefetch=4, stall_timeout=0.2)
    it = iter(stream)
    assert next(it) == 0
    ctx.run(asyncio.sleep(0.6))
    assert source.closed and source.produced < 20
    stream.close()
