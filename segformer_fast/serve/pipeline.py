"""One segmentation request from its body to its output, as both APIs (``/v1`` and the Open Inference Protocol's
``/v2``) run it, without an HTTP framework: read the body, take an admission slot, read the image's header, reserve
its pixels, decode and resize it, call a model replica, render the output, all within the request's deadline.

- **Deadline.** Everything, reading the body included, runs within ``timeout_s``: a body still arriving at the
  deadline is a 408 (and the connection is closed), anything later a 504. A replica call cut off by the deadline is
  cancelled (Ray Serve drops it from its batch if it has not run yet), and the request's slot and pixels are given
  back only once the replica has let go of it: a client that times out cannot leave unbounded work queued.
- **Threads.** Decoding, resizing and encoding run on ``CODEC_THREADS`` threads, never on the event loop.
- **Errors.** Every failure becomes an :class:`~segformer_fast.serve.api.ApiError`: a replica lost mid-request
  or out of memory is a 503 with ``Retry-After``, anything unexpected a 500 with one line (the log has the rest).
- **Timings.** Each answer has its stages in ms (``Server-Timing``): read, decode, admit (waiting for pixels),
  queue (in the replica, before its forward), forward, hop (the replica call's time outside the replica: Ray's
  routing, serialization and transfers), encode, total.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from ray import exceptions as ray_exceptions

from segformer_fast.core.runtime import is_out_of_memory
from segformer_fast.serve.admission import Admission
from segformer_fast.serve.api import RETRY_AFTER_S, ApiError, SegmentRequest, ServeSettings
from segformer_fast.serve.uploads import check_work_size, decode_image, image_bytes, model_input, open_image

logger = logging.getLogger("segformer_fast.serve")
#: Threads that decode, resize and encode images (PIL and zlib release the GIL while they work).
CODEC_THREADS = 2
STAGES = ("read", "decode", "admit", "queue", "forward", "hop", "encode", "total")
_LOST = tuple(getattr(ray_exceptions, name) for name in (
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError", "WorkerCrashedError",
    "NodeDiedError") if hasattr(ray_exceptions, name))


@dataclasses.dataclass
class Upload:
    """What a request brings: an encoded image (``data`` with its ``content_type``, raw or multipart) or pixels
    (``pixels``, (H, W, 3) uint8, from the Open Inference Protocol's UINT8 tensor)."""

    data: bytes | None = None
    content_type: str | None = None
    pixels: np.ndarray | None = None


@dataclasses.dataclass
class Answer:
    """A request's result: what ``render`` made of it, the images in its forward, and its stages in seconds."""

    output: object
    batch: int
    timings: dict

    def server_timing(self) -> str:
        return ", ".join(f"{name};dur={1e3 * self.timings[name]:.1f}" for name in STAGES if name in self.timings)


def _cause(error: BaseException) -> BaseException:
    """The replica's own exception inside a RayTaskError, else ``error``."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def failure(error: BaseException) -> ApiError:
    """The ApiError for what went wrong on the way to a replica or inside it; never a traceback."""
    if isinstance(error, ApiError):
        return error
    cause = _cause(error)
    if isinstance(error, _LOST) or isinstance(cause, _LOST):
        return ApiError(503, "the model replica handling this request was lost; it is being restarted, retry",
                        {"Retry-After": str(RETRY_AFTER_S)})
    if is_out_of_memory(cause) or isinstance(cause, MemoryError):
        return ApiError(503, "out of memory running this request; retry later or send a smaller image",
                        {"Retry-After": str(RETRY_AFTER_S)})
    logger.error("request failed: %s: %s", type(cause).__name__, cause)
    return ApiError(500, f"internal error ({type(cause).__name__}; the server's log has the details)")


class Pipeline:
    """What every segmentation route shares: the settings, the model deployment's handle, the codec threads and
    the admission of requests and pixels."""

    def __init__(self, settings: ServeSettings, model):
        self.settings = settings
        self.model = model
        self.codec = ThreadPoolExecutor(max_workers=CODEC_THREADS, thread_name_prefix="codec")
        self.admission = Admission(settings.max_queue, settings.pixels_in_flight)

    async def run(self, request: SegmentRequest, read: Callable[[], Awaitable[Upload]],
                  render: Callable[..., object], *, keep_image: bool = False, logits: bool = False,
                  disconnected: Callable[[], Awaitable[None]] | None = None) -> Answer:
        """Run one request within ``request.timeout_s``. ``read``: reads the body (inside the deadline);
        ``render(labels, image, logits)``: the output, on a codec thread (``image``: the decoded PIL image where
        ``keep_image``, else None; ``logits``: (K, h, w) float32 at a quarter of the work size where ``logits``
        was asked for, else None); ``disconnected()``: returns when the client has gone (called once the body is
        read), which cancels the work as a timeout does. Raises ApiError only."""
        phase = ["read"]
        try:
            return await asyncio.wait_for(self._run(request, read, render, keep_image, logits, phase, disconnected),
                                          request.timeout_s)
        except asyncio.TimeoutError:
            if phase[0] == "read":
                raise ApiError(408, f"the request body was not received within {request.timeout_s:g} s",
                               {"Connection": "close"}) from None
            raise ApiError(504, f"no result within {request.timeout_s:g} s (timeout_s / --request-timeout-s)") \
                from None
        except ApiError:
            raise
        except Exception as error:
            raise failure(error) from None

    async def _run(self, request, read, render, keep_image, logits, phase, disconnected) -> Answer:
        start = time.perf_counter()
        upload = await read()
        phase[0] = "work"
        work = asyncio.ensure_future(self._work(request, upload, render, keep_image, logits, start))
        del upload
        if disconnected is None:
            return await work
        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # cut off by the deadline, or the client gone: the work is cancelled (and its replica call)
            watcher.cancel()
            if not work.done():
                work.cancel()
        if work.done() and not work.cancelled():
            return work.result()
        raise ApiError(400, "the client disconnected before its answer")

    async def _work(self, request, upload, render, keep_image, logits, start) -> Answer:
        timings: dict = {"read": time.perf_counter() - start}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = timings.get(name, 0.0) + now - clock
            clock = now

        ticket = self.admission.admit()
        call = response = None
        try:
            loop = asyncio.get_running_loop()
            opened, (height, width) = await loop.run_in_executor(self.codec, self._open, upload)
            target = check_work_size(request, height, width, self.settings.max_pixels)
            lap("decode")
            await self.admission.reserve(ticket, height * width + target[0] * target[1])
            lap("admit")
            image, array = await loop.run_in_executor(self.codec, self._prepare, opened, upload, request, target,
                                                      keep_image)
            lap("decode")
            method = self.model.logits if logits else self.model.segment
            response = method.remote(array, request, (height, width))
            del array
            call = asyncio.ensure_future(_result(response))
            entered = time.perf_counter()
            result = await asyncio.shield(call)
            call = None
            replica_s = time.perf_counter() - entered
            if logits:
                logit_map, labels, replica_times = result
                batch = 1
            else:
                (labels, batch, replica_times), logit_map = result, None
            timings.update(queue=replica_times["queue"], forward=replica_times["forward"],
                           hop=max(0.0, replica_s - replica_times["queue"] - replica_times["forward"]))
            clock = time.perf_counter()
            output = await loop.run_in_executor(self.codec, render, labels, image, logit_map)
            lap("encode")
            timings["total"] = time.perf_counter() - start
            return Answer(output, batch, timings)
        finally:
            if call is not None and not call.done():
                # cut off by the deadline: cancel the replica's work, free the slot once the replica let go of it
                response.cancel()
                call.add_done_callback(lambda done: self._let_go(done, ticket))
            else:
                self.admission.release(ticket)

    def _let_go(self, call: asyncio.Future, ticket) -> None:
        """A cancelled replica call has ended (cancelled, or finished after all): its outcome is nobody's now."""
        if not call.cancelled():
            call.exception()  # retrieved, so asyncio does not log it
        self.admission.release(ticket)

    def _open(self, upload: Upload) -> tuple:
        """(opened image or None for pixels, (H, W)): the header only, on a codec thread."""
        if upload.pixels is not None:
            return None, upload.pixels.shape[:2]
        opened = open_image(image_bytes(upload.data or b"", upload.content_type), self.settings.max_pixels)
        return opened, (opened.height, opened.width)

    def _prepare(self, opened, upload: Upload, request: SegmentRequest, target: tuple, keep_image: bool) -> tuple:
        """(the image where kept, the replica's input array): the pixels decoded and resized on a codec thread."""
        image = decode_image(opened) if opened is not None else Image.fromarray(upload.pixels, "RGB")
        upload.data = upload.pixels = None  # the body is not needed any more
        return (image if keep_image else None), model_input(image, request, target)


async def _result(response):
    return await response
