"""The CUDA-graph cache: its logic on CPU (injected capture and streams), the real thing on CUDA."""

import threading

import pytest
import torch

from segformer_fast import Segformer
from segformer_fast.engine.engine import optimize
from segformer_fast.engine.graph_cache import (
    FIRST_RETRY_AFTER,
    MAX_RETRY_AFTER,
    CUDAGraphCache,
    FailedCapture,
    GraphEntry,
    static_buffer_like,
)

from helpers import assert_relative_close

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the CPU tests above cover the cache logic)")


def forward(pixels):
    """A stand-in forward (B, 3, H, W) -> (B, 3, H, W) whose result depends on every input value."""
    return pixels * 2.0 + pixels.sum()


class Log:
    """The order of the stream, event and graph operations of the fakes below."""

    def __init__(self):
        self.calls = []


class FakeEvent:
    def __init__(self, log):
        self.log = log
        self.recorded_on = None

    def record(self, stream):
        self.recorded_on = stream.name
        self.log.calls.append(("record", stream.name))


class FakeStream:
    def __init__(self, name, log):
        self.name = name
        self.log = log

    def wait_event(self, event):
        self.log.calls.append(("wait", self.name, event.recorded_on))


class FakeGraph:
    """Replays ``forward`` from the static input into the static output, as a captured graph would."""

    def __init__(self, static_input, static_output, log):
        self.static_input, self.static_output, self.log = static_input, static_output, log

    def replay(self):
        self.log.calls.append(("replay", float(self.static_input.sum())))
        self.static_output.copy_(forward(self.static_input))


class FakeCapture:
    """``capture(forward, pixels)``: raises for the first ``failures`` calls, then builds a GraphEntry of fakes."""

    def __init__(self, log, failures=0):
        self.log = log
        self.failures = failures
        self.attempts = []

    def __call__(self, fn, pixels):
        self.attempts.append(tuple(pixels.shape))
        if len(self.attempts) <= self.failures:
            raise RuntimeError("operation not permitted when stream is capturing")
        static_input = static_buffer_like(pixels)
        static_output = fn(static_input)
        return GraphEntry(FakeGraph(static_input, static_output, self.log), static_input, static_output,
                          FakeEvent(self.log))


def make_cache(log, failures=0, size=8, stream_name="s0"):
    capture = FakeCapture(log, failures)
    streams = {"name": stream_name}
    cache = CUDAGraphCache(forward, size, capture=capture,
                           current_stream=lambda device: FakeStream(streams["name"], log))
    return cache, capture, streams


def test_static_buffer_made_under_inference_mode_is_a_normal_tensor():
    source = torch.randn(2, 3, 5, 7)
    with torch.inference_mode():
        inference_input = source.clone()
        buffer = static_buffer_like(inference_input)
    assert inference_input.is_inference(), "the test's input should be an inference tensor"
    assert not buffer.is_inference() and not buffer.requires_grad
    assert torch.equal(buffer, source) and buffer.data_ptr() != inference_input.data_ptr()
    fresh = torch.randn(2, 3, 5, 7)
    buffer.copy_(fresh)  # outside inference mode: an inference tensor would raise here
    assert torch.equal(buffer, fresh)
    with torch.inference_mode():
        buffer.copy_(source)  # and inside it too
    assert torch.equal(buffer, source)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        inference_input.copy_(fresh)  # what the cache used to do


def test_cache_captured_under_inference_mode_replays_outside_it():
    log = Log()
    cache, capture, _ = make_cache(log)
    first = torch.randn(1, 3, 4, 6)
    with torch.inference_mode():
        got = cache(first)
    assert torch.equal(got, forward(first))
    second = torch.randn(1, 3, 4, 6)
    assert torch.equal(cache(second), forward(second))
    assert capture.attempts == [(1, 3, 4, 6)]


def test_replay_orders_the_callers_stream_after_the_previous_replay():
    log = Log()
    cache, _, streams = make_cache(log)
    inputs = [torch.randn(1, 3, 4, 4) for _ in range(3)]
    outputs = []
    for name, pixels in zip(["s0", "s1", "s0"], inputs):
        streams["name"] = name
        outputs.append(cache(pixels))
    # each replay: wait for the previous replay's event, then replay the new input (copied in first), then record
    # the event on the caller's stream
    assert log.calls == [
        ("wait", "s0", None), ("replay", float(inputs[0].sum())), ("record", "s0"),
        ("wait", "s1", "s0"), ("replay", float(inputs[1].sum())), ("record", "s1"),
        ("wait", "s0", "s1"), ("replay", float(inputs[2].sum())), ("record", "s0"),
    ]
    static_output = cache.graphs[next(iter(cache.graphs))].static_output
    for pixels, output in zip(inputs, outputs):
        assert torch.equal(output, forward(pixels)), "a later replay overwrote an earlier caller's output"
        assert output.data_ptr() != static_output.data_ptr()


def test_failed_capture_runs_plain_launches_and_is_retried_with_backoff():
    log = Log()
    cache, capture, _ = make_cache(log, failures=2)
    key = ((1, 3, 8, 8), torch.float32, torch.device("cpu"))
    with pytest.warns(UserWarning, match=r"capture failed .*retried after 16 calls"):
        pixels = torch.randn(1, 3, 8, 8)
        assert torch.equal(cache(pixels), forward(pixels))
    assert cache.graphs[key] == FailedCapture(calls_left=FIRST_RETRY_AFTER, backoff=FIRST_RETRY_AFTER)
    assert not cache.captured(pixels) and not cache.captured(torch.randn(1, 3, 8, 9))
    for _ in range(FIRST_RETRY_AFTER):  # plain launches, no capture attempt
        pixels = torch.randn(1, 3, 8, 8)
        assert torch.equal(cache(pixels), forward(pixels))
    assert len(capture.attempts) == 1
    cache(torch.randn(1, 3, 8, 8))  # second attempt fails too: the backoff doubles (no second warning)
    assert len(capture.attempts) == 2
    assert cache.graphs[key] == FailedCapture(calls_left=2 * FIRST_RETRY_AFTER, backoff=2 * FIRST_RETRY_AFTER)
    for _ in range(2 * FIRST_RETRY_AFTER):
        cache(torch.randn(1, 3, 8, 8))
    pixels = torch.randn(1, 3, 8, 8)
    assert torch.equal(cache(pixels), forward(pixels))  # third attempt succeeds: replayed from now on
    assert len(capture.attempts) == 3 and isinstance(cache.graphs[key], GraphEntry)
    assert cache.captured(pixels) and not cache.captured(pixels.double())
    assert log.calls[-2] == ("replay", float(pixels.sum()))


def test_backoff_is_capped():
    log = Log()
    cache, capture, _ = make_cache(log, failures=10**6)
    key = ((1, 3, 2, 2), torch.float32, torch.device("cpu"))
    with pytest.warns(UserWarning):
        cache(torch.randn(1, 3, 2, 2))
    backoffs = []
    while len(backoffs) < 8:
        entry = cache.graphs[key]
        if entry.calls_left == 0:
            backoffs.append(entry.backoff)
        cache(torch.randn(1, 3, 2, 2))
    assert backoffs[:7] == [16, 32, 64, 128, 256, 512, 1024] and backoffs[7] == MAX_RETRY_AFTER


def test_cache_evicts_least_recently_used():
    log = Log()
    cache, capture, _ = make_cache(log, size=2)
    shapes = [(1, 3, 32, 32), (1, 3, 32, 32), (1, 3, 40, 32), (1, 3, 48, 32), (1, 3, 32, 32)]
    for shape in shapes:
        pixels = torch.randn(shape)
        assert torch.equal(cache(pixels), forward(pixels))
    # 32x32 captured once, then evicted by 40 and 48 (cache of 2), so captured again at the end
    assert capture.attempts == [(1, 3, 32, 32), (1, 3, 40, 32), (1, 3, 48, 32), (1, 3, 32, 32)]
    assert [key[0] for key in cache.graphs] == [(1, 3, 48, 32), (1, 3, 32, 32)]


def test_engine_routes_calls_through_the_cache():
    """The engine's cache (forced on for CPU tensors) with an injected capture gives the reference's logits."""
    model = Segformer.from_config("b0", num_labels=3, seed=1)
    engine = optimize(model, verify=False, graph_cache_size=2)
    engine.use_cuda_graphs = True
    log = Log()
    engine.graph_cache.capture = FakeCapture(log, failures=1)
    engine.graph_cache.current_stream = lambda device: FakeStream("s0", log)
    pixels = torch.randn(1, 3, 32, 40)
    with pytest.warns(UserWarning, match="capture failed"), torch.no_grad():
        assert_relative_close(engine(pixels), model(pixels), 1e-5, "plain launches after a failed capture")
    assert engine.graph_cache.capture.attempts == [(1, 3, 32, 40)]


# ------------------------------------------------------------------------------------------------------- CUDA
def _cuda_engine():
    model = Segformer.from_config("b0", num_labels=19, seed=3).cuda()
    return model, optimize(model, dtype=torch.float16)


@needs_cuda
def test_cuda_shape_first_captured_under_inference_mode_works_outside_it():
    model, engine = _cuda_engine()
    plain = optimize(model, dtype=torch.float16, cuda_graphs=False)
    first = torch.randn(1, 3, 128, 160, device="cuda")
    with torch.inference_mode():
        engine(first)
    for grad_mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        pixels = torch.randn(1, 3, 128, 160, device="cuda")
        with grad_mode():
            got = engine(pixels)
        assert torch.equal(got, plain(pixels)), grad_mode.__name__
    assert isinstance(engine.graph_cache.graphs[((1, 3, 128, 160), torch.float16, torch.device("cuda", 0))],
                      GraphEntry)


@needs_cuda
def test_cuda_concurrent_callers_on_two_streams_get_their_own_results():
    model, engine = _cuda_engine()
    plain = optimize(model, dtype=torch.float16, cuda_graphs=False)
    shape = (2, 3, 256, 256)
    engine(torch.randn(shape, device="cuda"))  # captured
    inputs = [[torch.randn(shape, device="cuda") for _ in range(6)] for _ in range(2)]
    expected = [[plain(x) for x in row] for row in inputs]
    torch.cuda.synchronize()
    results, errors = [[None] * 6, [None] * 6], []

    def work(index):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for i, pixels in enumerate(inputs[index]):
                    torch.cuda._sleep(1_000_000)  # keep the stream busy so the replays overlap in time
                    results[index][i] = engine(pixels)
            stream.synchronize()
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for row_got, row_want in zip(results, expected):
        for got, want in zip(row_got, row_want):
            assert torch.equal(got, want)


@needs_cuda
def test_cuda_failed_capture_restores_the_callers_stream_and_recovers():
    calls = {"n": 0}

    def flaky_forward(pixels):
        calls["n"] += 1
        if torch.cuda.is_current_stream_capturing() and calls["n"] <= 3:
            torch.cuda.synchronize()  # illegal while capturing: the capture fails
        return pixels * 3.0

    cache = CUDAGraphCache(flaky_forward, 4)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        pixels = torch.randn(1, 3, 16, 16, device="cuda")
        with pytest.warns(UserWarning, match="capture failed"):
            got = cache(pixels)
        assert torch.cuda.current_stream() == stream
    assert torch.equal(got, pixels * 3.0)
    key = ((1, 3, 16, 16), torch.float32, torch.device("cuda", 0))
    assert isinstance(cache.graphs[key], FailedCapture)
    for _ in range(FIRST_RETRY_AFTER + 1):
        pixels = torch.randn(1, 3, 16, 16, device="cuda")
        assert torch.equal(cache(pixels), pixels * 3.0)
    assert isinstance(cache.graphs[key], GraphEntry)
