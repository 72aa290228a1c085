"""Dynamic batching for a model replica (asyncio, one event loop; no Ray): requests wait in one queue and one worker
runs them in batches on the forward thread.

Greedy: when the forward thread frees up, everything that queued meanwhile (up to ``max_batch_size``) goes into the
next batch at once; only a worker that was idle waits ``wait_s`` after the first request for others to join it.
So a busy replica never sits idle waiting for a batch to fill (Ray Serve's ``@serve.batch`` closes each batch
``wait_s`` after its first request, while the previous forward still runs, and under load dispatched batches of one
or two), and a batch holds whatever arrived during the forward before it. A request whose caller was cancelled
(its deadline passed, its client left) is dropped when its batch is taken, never run.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from concurrent.futures import Executor


class Batcher:
    """``await batcher.submit(item)`` -> ``run_batch([items])[i]`` for that item, run on ``executor``."""

    def __init__(self, run_batch: Callable[[list], list], executor: Executor, max_batch_size: int, wait_s: float):
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._pending: collections.deque = collections.deque()  # (item, future)
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._work())
        future = loop.create_future()
        self._pending.append((item, future))
        self._arrived.set()
        return await future

    def _live(self) -> int:
        return sum(not future.cancelled() for _, future in self._pending)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if not self._pending:  # set by requests a batch already took
                continue
            if self.wait_s > 0 and self._live() < self.max_batch_size:  # idle until now: let others join
                deadline = loop.time() + self.wait_s
                while self._live() < self.max_batch_size and loop.time() < deadline:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        break
            while self._pending:  # busy: what queued during a forward runs next, without waiting
                batch = []
                while self._pending and len(batch) < self.max_batch_size:
                    item, future = self._pending.popleft()
                    if not future.cancelled():
                        batch.append((item, future))
                if not batch:
                    continue
                try:
                    results = await loop.run_in_executor(self.executor, self.run_batch, [item for item, _ in batch])
                except Exception as error:  # run_batch reports per-item failures itself; this is anything else
                    results = [error] * len(batch)
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
