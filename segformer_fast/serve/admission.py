"""Admission: how many requests, and how many pixels, the service holds at once (asyncio, one event loop).

A request takes a slot when its body has been read (``--max-queue`` slots; past them 503 at once, with
``Retry-After``), then, once its image's header says its size, reserves its pixels: the image's own plus those of
the size it runs at (``--max-pixels-in-flight`` in all). A reservation that does not fit waits its turn, first come
first served, within the request's deadline; pixels are decoded only once reserved, so the decoded images,
resized copies, label maps and outputs in flight are bounded by the pixel budget whatever the clients send. A slot
and its pixels come back when the request's work has ended, which for a request that timed out is when its model
replica has dropped or finished it, not when its 504 was sent. Draining (shutdown) refuses new requests with 503
and lets :meth:`Admission.drained` wait for those in flight.
"""

from __future__ import annotations

import asyncio
import collections

from segformer_fast.serve.api import RETRY_AFTER_S, ApiError


class Ticket:
    """One admitted request: the pixels it holds (0 until reserved)."""

    __slots__ = ("pixels", "released")

    def __init__(self):
        self.pixels = 0
        self.released = False


class Admission:
    def __init__(self, max_requests: int, max_pixels: int):
        self.max_requests = max_requests
        self.max_pixels = max_pixels
        self.requests = 0
        self.pixels = 0
        self.draining = False
        self._waiting: collections.deque = collections.deque()  # (ticket, pixels, future) in arrival order
        self._idle: list = []  # futures waiting for no request in flight

    def admit(self) -> Ticket:
        """A slot for a request whose body has been read; ApiError 503 when draining or over ``max_requests``."""
        if self.draining:
            raise ApiError(503, "the service is shutting down; retry on another instance or later",
                           {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
        if self.requests >= self.max_requests:
            raise ApiError(503, f"over capacity: {self.requests} requests in flight (--max-queue "
                                f"{self.max_requests}); retry later", {"Retry-After": str(RETRY_AFTER_S)})
        self.requests += 1
        return Ticket()

    async def reserve(self, ticket: Ticket, pixels: int) -> None:
        """Hold ``pixels`` for ``ticket``, waiting (first come, first served) until they fit. A caller cancelled
        while waiting (its deadline) leaves the queue without holding anything."""
        if pixels > self.max_pixels:
            raise ApiError(413, f"{pixels} pixels (image and work size) over the --max-pixels-in-flight limit of "
                                f"{self.max_pixels}")
        if not self._waiting and self.pixels + pixels <= self.max_pixels:
            self._take(ticket, pixels)
            return
        future = asyncio.get_running_loop().create_future()
        entry = (ticket, pixels, future)
        self._waiting.append(entry)
        try:
            await future  # the pixels are taken for the ticket before the future is resolved
        except asyncio.CancelledError:
            if entry in self._waiting:
                self._waiting.remove(entry)
                self._wake()
            raise

    def release(self, ticket: Ticket) -> None:
        """Give back the request's slot and pixels (once; a second call does nothing)."""
        if ticket.released:
            return
        ticket.released = True
        self.requests -= 1
        self.pixels -= ticket.pixels
        ticket.pixels = 0
        self._wake()
        if self.requests == 0:
            for future in self._idle:
                if not future.done():
                    future.set_result(None)
            self._idle.clear()

    async def drained(self, timeout_s: float) -> bool:
        """Refuse new requests from now on and wait until none is in flight; False when ``timeout_s`` passed first."""
        self.draining = True
        if self.requests == 0:
            return True
        future = asyncio.get_running_loop().create_future()
        self._idle.append(future)
        try:
            await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _take(self, ticket: Ticket, pixels: int) -> None:
        self.pixels += pixels
        ticket.pixels += pixels

    def _wake(self) -> None:
        """Let waiting reservations in, in order, while the head of the queue fits: its pixels are taken for its
        ticket here, so a request that arrives meanwhile is judged against them."""
        while self._waiting:
            ticket, pixels, future = self._waiting[0]
            if not future.done() and self.pixels + pixels > self.max_pixels:
                return
            self._waiting.popleft()
            if not future.done():
                self._take(ticket, pixels)
                future.set_result(None)
