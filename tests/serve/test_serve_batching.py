"""The model replica's batching (``serve.batching.Batcher``), on its own: what queued during a forward runs as the next
batch at once, batches never exceed the maximum, cancelled requests are dropped before they run, and an idle
worker waits for others to join the first request. The batch function is a plain function on a real thread pool;
a threading.Event holds the first forward, so the test controls what queues during it (no timing asserted)."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from segformer_fast.serve.batching import Batcher


class Forwards:
    """A batch function that records its batches; the first one blocks until ``release``."""

    def __init__(self):
        self.batches = []
        self.first_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: list) -> list:
        if not self.batches:
            self.first_started.set()
            self.release.wait(30)
        self.batches.append(list(items))
        return [item * 10 for item in items]


async def wait_until(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.001)


def test_what_queues_during_a_forward_is_the_next_batch_and_cancelled_ones_are_dropped():
    async def scenario():
        forwards = Forwards()
        batcher = Batcher(forwards, ThreadPoolExecutor(1), max_batch_size=4, wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit(0))
        await wait_until(forwards.first_started)
        queued = [asyncio.ensure_future(batcher.submit(item)) for item in range(1, 8)]
        await asyncio.sleep(0.01)
        queued[1].cancel()  # items 2 and 5: their callers gave up while the first forward ran
        queued[4].cancel()
        forwards.release.set()
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        return forwards.batches, results

    batches, results = asyncio.run(scenario())
    assert batches == [[0], [1, 3, 4, 6], [7]]
    assert [r for r in results if not isinstance(r, BaseException)] == [0, 10, 30, 40, 60, 70]
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 2


def test_an_idle_worker_waits_for_others_to_join():
    async def scenario():
        forwards = Forwards()
        forwards.release.set()
        batcher = Batcher(forwards, ThreadPoolExecutor(1), max_batch_size=3, wait_s=30.0)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # the worker is waiting for others to join the first request
        assert forwards.batches == []
        # two more fill the batch, which ends the wait at once
        results = await asyncio.gather(first, batcher.submit(1), batcher.submit(2))
        return forwards.batches, results

    batches, results = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert batches == [[0, 1, 2]] and results == [0, 10, 20]


def test_a_failing_batch_fails_its_own_requests_only():
    async def scenario():
        calls = []

        def run(items):
            calls.append(items)
            if len(calls) == 1:
                raise RuntimeError("the forward failed")
            return items

        batcher = Batcher(run, ThreadPoolExecutor(1), max_batch_size=2, wait_s=0.0)
        first = await batcher.submit(1)
        second = await batcher.submit(2)
        return first, second

    first, second = asyncio.run(scenario())
    assert isinstance(first, RuntimeError) and second == 2
