"""Fixtures of the benchmark tests: a private runner registry, and a fake clock for the timing loops."""

import bench_model as bench
import pytest


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the runner registry, so tests can register fakes without leaking them."""
    monkeypatch.setattr(bench, "RUNNERS", dict(bench.RUNNERS))
    monkeypatch.setattr(bench, "RUNNER_DEFAULT_ON", dict(bench.RUNNER_DEFAULT_ON))
    return bench.RUNNERS


@pytest.fixture
def fake_clock(monkeypatch):
    """time_call_ms calls the function and reports the runner's fake_ms: each row's timings are checked without
    timing anything."""
    import bench_common.protocol as protocol

    def time_call_ms(fn, device):
        fn()
        return fn.func.fake_ms  # fn is functools.partial(runner, pixel_values)

    monkeypatch.setattr(protocol, "time_call_ms", time_call_ms)
