"""benchmarks/bench_serve.py smoke-runs: ``--quick --no-save`` starts a real local server, loads it, sends
malformed requests among good ones, and prints the table and the checks (no number is asserted: a test machine is
no quiet machine)."""

import subprocess
import sys

import pytest

from helpers import ROOT


def test_bench_serve_quick_run(tmp_path):
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "ray[serve]")')
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--quick", "--no-save"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "direct engine.segment:" in out
    assert "| batching | max batch | concurrency | images/s | x direct | p50 ms | p99 ms | mean batch |" in out
    assert "| on | 4 | 1 |" in out and "| on | 4 | 4 |" in out  # batching on, max batch 4, concurrency 1 and 4
    assert "0 5xx other than 503, malformed all 4xx: True, replica survived: True" in out
    assert "p99 / p50" in out
    stages = ("| batching | concurrency | read | decode | admit | queue | forward | hop | encode | total | client "
              "| http |")
    assert stages in out  # where the time goes, from the service's Server-Timing
    assert not list(tmp_path.iterdir()), "the smoke run wrote files"
