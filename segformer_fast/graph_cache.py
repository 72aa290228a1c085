"""A CUDA graph per input (shape, dtype, device), least recently used evicted: the engine's launch-bound fix.

Batch 1 runs about a hundred small kernels per image, so on CUDA the whole forward is captured once per input
shape and replayed. Capture is an optimization: a shape whose capture fails is remembered (and runs plain
launches) and the failure is warned about once.
"""

import collections
import threading
import warnings

import torch


class CUDAGraphCache:
    """Replays ``forward`` from a CUDA graph captured per (shape, dtype, device) of its input.

    forward: a callable (B, 3, H, W) -> tensor whose launches can be captured; size: the most graphs kept (LRU).
    Calls may come from several threads: the cache is guarded by a lock and each graph replays under it, so every
    caller gets its own, correct output (a clone of the graph's static output).
    """

    def __init__(self, forward, size: int):
        if size < 1:
            raise ValueError(f"graph_cache_size must be >= 1, got {size}")
        self.forward = forward
        self.size = size
        self.graphs = collections.OrderedDict()  # key -> (graph, static input, static output), or None
        self._lock = threading.Lock()
        self._warning_given = False

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        key = (tuple(pixel_values.shape), pixel_values.dtype, pixel_values.device)
        with self._lock:
            if key in self.graphs:
                self.graphs.move_to_end(key)
                entry = self.graphs[key]
            else:
                entry = self.capture(pixel_values)  # None (remembered) when this shape cannot be captured
                self.graphs[key] = entry
                while len(self.graphs) > self.size:
                    self.graphs.popitem(last=False)
            if entry is None:
                return self.forward(pixel_values)
            graph, static_input, static_output = entry
            static_input.copy_(pixel_values)
            graph.replay()
            return static_output.clone()

    def capture(self, pixel_values: torch.Tensor):
        """(graph, static input, static output) of ``forward`` for this input, or None if capture fails."""
        try:
            static_input = pixel_values.clone()
            stream = torch.cuda.Stream(device=pixel_values.device)
            stream.wait_stream(torch.cuda.current_stream(pixel_values.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: Triton compiles, cuDNN picks algorithms, allocator settles
                    self.forward(static_input)
            torch.cuda.current_stream(pixel_values.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.forward(static_input)
            return graph, static_input, static_output
        except Exception as err:  # capture is an optimization: never fail a call because of it
            if not self._warning_given:
                self._warning_given = True
                warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); using plain launches",
                              stacklevel=4)
            return None
