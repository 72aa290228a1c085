"""A CUDA graph per input (shape, dtype, device), least recently used evicted: the engine's launch-bound fix.

Batch 1 runs about a hundred small kernels per image, so on CUDA the whole forward is captured once per input
shape and replayed. Capture is an optimization: a shape whose capture fails runs plain launches, is tried again
after a backoff (``FIRST_RETRY_AFTER`` calls, doubling per failure up to ``MAX_RETRY_AFTER``), and the first
failure is warned about.

What each entry guards against:

- the caller's grad mode: the static input and output are made outside ``torch.inference_mode`` (a shape first
  seen under inference mode still replays outside it, where an inference tensor could not be written);
- several CUDA streams: a replay orders the caller's stream after the previous replay's completion (an event per
  entry) before overwriting the static input, and the copy, replay and output clone run on the caller's stream,
  after its earlier work;
- failed captures: the thread-local capture error mode (other threads' CUDA calls do not invalidate the capture,
  nor does it fail theirs) and the caller's current stream restored whatever happens.
"""

import collections
import dataclasses
import threading
import warnings

import torch

#: Plain-launch calls of a shape after its first failed capture before capture is tried again.
FIRST_RETRY_AFTER = 16
#: The longest backoff between capture attempts of one shape (calls).
MAX_RETRY_AFTER = 1024
#: Warm-up runs before capture: Triton compiles, cuDNN picks algorithms, the allocator settles.
WARMUP_RUNS = 2


def static_buffer_like(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (not inference) tensor with ``tensor``'s shape, dtype, device and values, whatever the grad mode.

    A buffer made under ``torch.inference_mode()`` would be an inference tensor, and later in-place copies into it
    outside inference mode raise; this one accepts them in every mode.
    """
    with torch.inference_mode(False), torch.no_grad():
        buffer = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        buffer.copy_(tensor)
    return buffer


@dataclasses.dataclass
class GraphEntry:
    """One captured shape: replaying ``graph`` reads ``static_input`` and writes ``static_output``.

    replay_done: an event recorded on the stream of the latest replay, after its output was cloned (a
    ``torch.cuda.Event``; anything with ``record(stream)`` that the streams' ``wait_event`` accepts).
    """

    graph: object
    static_input: torch.Tensor
    static_output: torch.Tensor
    replay_done: object

    def replay(self, pixel_values: torch.Tensor, stream) -> torch.Tensor:
        """Copy in, replay, clone out, all ordered on ``stream`` (the caller's) after the previous replay."""
        stream.wait_event(self.replay_done)  # the previous replay (any stream) has finished with the buffers
        self.static_input.copy_(pixel_values)
        self.graph.replay()
        output = self.static_output.clone()
        self.replay_done.record(stream)
        return output


@dataclasses.dataclass
class FailedCapture:
    """A shape whose capture failed: plain launches for ``calls_left`` more calls, then another capture attempt."""

    calls_left: int
    backoff: int


def capture_cuda_graph(forward, pixel_values: torch.Tensor) -> GraphEntry:
    """Capture ``forward`` on a static copy of ``pixel_values`` (B, 3, H, W) into a CUDA graph; raises on failure.

    :class:`CUDAGraphCache` calls it outside inference mode, so the static output is a normal tensor; the caller's
    current stream is restored even when warm-up or capture raises.
    """
    device = pixel_values.device
    caller_stream = torch.cuda.current_stream(device)
    try:
        static_input = static_buffer_like(pixel_values)
        warmup_stream = torch.cuda.Stream(device=device)
        warmup_stream.wait_stream(caller_stream)
        with torch.cuda.stream(warmup_stream):
            for _ in range(WARMUP_RUNS):
                forward(static_input)
        caller_stream.wait_stream(warmup_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_output = forward(static_input)
    finally:
        # torch.cuda.graph's exit skips restoring the stream when ending a broken capture raises
        torch.cuda.set_stream(caller_stream)
    replay_done = torch.cuda.Event()
    replay_done.record(caller_stream)
    return GraphEntry(graph, static_input, static_output, replay_done)


class CUDAGraphCache:
    """Replays ``forward`` from a CUDA graph captured per (shape, dtype, device) of its input.

    forward: a callable (B, 3, H, W) -> tensor whose launches can be captured; size: the most graphs kept (LRU).
    capture: ``capture(forward, pixel_values) -> GraphEntry`` (raises when capture fails); current_stream:
    ``current_stream(device)`` the caller's stream. Both default to CUDA's; tests inject their own.
    Calls may come from several threads and streams: the cache is guarded by a lock, replays are ordered across
    streams (see :class:`GraphEntry`), and every caller gets its own output (a clone of the graph's static output).
    """

    def __init__(self, forward, size: int, *, capture=capture_cuda_graph, current_stream=None):
        if size < 1:
            raise ValueError(f"graph_cache_size must be >= 1, got {size}")
        self.forward = forward
        self.size = size
        self.capture = capture
        self.current_stream = current_stream if current_stream is not None else torch.cuda.current_stream
        self.graphs = collections.OrderedDict()  # key -> GraphEntry or FailedCapture
        self._lock = threading.Lock()
        self._warning_given = False

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        key = (tuple(pixel_values.shape), pixel_values.dtype, pixel_values.device)
        with self._lock:
            entry = self.graphs.get(key)
            if isinstance(entry, FailedCapture) and entry.calls_left > 0:
                entry.calls_left -= 1
                self.graphs.move_to_end(key)
                return self.forward(pixel_values)
            if entry is None or isinstance(entry, FailedCapture):
                entry = self._try_capture(pixel_values, entry)
                self.graphs[key] = entry
                while len(self.graphs) > self.size:
                    self.graphs.popitem(last=False)
            self.graphs.move_to_end(key)
            if isinstance(entry, FailedCapture):
                return self.forward(pixel_values)
            return entry.replay(pixel_values, self.current_stream(pixel_values.device))

    def captured(self, pixel_values: torch.Tensor) -> bool:
        """Whether a CUDA graph of ``pixel_values``' (shape, dtype, device) is held now (False when its capture
        failed and it runs plain launches, or it was never seen or was evicted). Reads only."""
        key = (tuple(pixel_values.shape), pixel_values.dtype, pixel_values.device)
        with self._lock:
            return isinstance(self.graphs.get(key), GraphEntry)

    def _try_capture(self, pixel_values: torch.Tensor, failed: FailedCapture | None):
        """A GraphEntry, or a FailedCapture with the next backoff (doubled after each failure of the shape)."""
        try:
            # static buffers made under the caller's inference_mode could not be written outside it later
            with torch.inference_mode(False), torch.no_grad():
                return self.capture(self.forward, pixel_values)
        except Exception as err:  # capture is an optimization: never fail a call because of it
            backoff = FIRST_RETRY_AFTER if failed is None else min(2 * failed.backoff, MAX_RETRY_AFTER)
            if not self._warning_given:
                self._warning_given = True
                warnings.warn(
                    f"CUDA graph capture failed for input {tuple(pixel_values.shape)} ({type(err).__name__}: "
                    f"{err}); using plain launches, capture retried after {backoff} calls", stacklevel=4)
            return FailedCapture(calls_left=backoff, backoff=backoff)
