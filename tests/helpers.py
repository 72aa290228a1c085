"""Shared test utilities: the tolerance rule as an assertion (``assert_within_tolerance``), outputs poisoned before a
kernel writes them (``poison_``), random transformers models with non-default norms, comparisons, and the check
that a CPU kernel's baseline loops match its vectorized ones. Every test folder reaches this module (tests/ is on
``sys.path`` through pyproject.toml's ``pythonpath``)."""

import collections
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from segformer_fast.core.numerics import max_abs_error, tolerance

#: The repository's root folder.
ROOT = Path(__file__).resolve().parent.parent


def assert_within_tolerance(
    actual: torch.Tensor,
    reference: torch.Tensor,
    dtype: torch.dtype,
    eager: torch.Tensor | None = None,
    what: str = "output",
) -> None:
    """Assert the tolerance rule: err(actual) <= 2 * err(eager) + floor(dtype) * max |reference|.

    ``reference`` is the high-precision result (fp64 or fp32); ``eager`` is eager PyTorch run in ``dtype`` (optional:
    without it only the floor applies).
    """
    eager_error = max_abs_error(eager, reference) if eager is not None else 0.0
    error = max_abs_error(actual, reference)
    allowed = tolerance(reference, dtype, eager_error)
    if not error <= allowed:
        raise AssertionError(
            f"{what}: max abs error {error:.3e} exceeds tolerance {allowed:.3e} "
            f"(dtype {dtype}, eager error {eager_error:.3e}, max |ref| {float(reference.abs().max()):.3e})"
        )


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN (integer tensors with their minimum) so unwritten elements fail a check."""
    if tensor.is_floating_point():
        return tensor.fill_(float("nan"))
    return tensor.fill_(torch.iinfo(tensor.dtype).min)


def randomize_norms_(module: torch.nn.Module, seed: int) -> None:
    """Move LayerNorm/BatchNorm affine parameters and BatchNorm running stats away from their defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                sub.weight.copy_(1 + 0.2 * torch.randn(sub.weight.shape, generator=generator))
                sub.bias.copy_(0.2 * torch.randn(sub.bias.shape, generator=generator))
            if isinstance(sub, torch.nn.BatchNorm2d):
                sub.running_mean.copy_(0.2 * torch.randn(sub.running_mean.shape, generator=generator))
                sub.running_var.copy_(0.5 + torch.rand(sub.running_var.shape, generator=generator))


def random_transformers_model(variant: str, num_labels: int, seed: int):
    """A transformers SegformerForSemanticSegmentation with transformers' own random init (norms randomized)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from segformer_fast.model.config import VARIANTS

    dims, depths, decoder_dim = VARIANTS[variant]
    torch.manual_seed(seed)
    config = SegformerConfig(
        hidden_sizes=list(dims), depths=list(depths), decoder_hidden_size=decoder_dim, num_labels=num_labels
    )
    model = SegformerForSemanticSegmentation(config).eval()
    randomize_norms_(model, seed)
    return model


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "output") -> None:
    """max |actual - expected| <= rtol * max |expected|."""
    error = max_abs_error(actual, expected)
    scale = float(expected.abs().max())
    assert error <= rtol * scale, f"{what}: max abs error {error:.3e} > {rtol:g} x max |ref| {scale:.3e}"


@contextlib.contextmanager
def counting_calls(owner, *names):
    """Replace the functions ``names`` of ``owner`` (a module or object) by counting wrappers for the block.

    Yields a Counter {name: calls}; the originals are put back on exit.
    """
    counts = collections.Counter()
    originals = {name: getattr(owner, name) for name in names}

    def spy(name):
        def counted(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return counted

    for name in names:
        setattr(owner, name, spy(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(owner, name, original)


def assert_baseline_loops_match_vectorized(script: str, tmp_path) -> None:
    """SEGFORMER_FAST_CPU_BASELINE=1 (read once per process) runs a CPU kernel's loops built for the baseline ISA.
    ``script`` computes the same inputs in a fresh process each way; it prints a JSON {dtype name: [max error,
    eager's max error, max |reference|]} as its last line and saves its outputs as ``<argv[1]>-<dtype name>.pt``.
    Both ways must pass the tolerance rule, and on a CPU with AVX-512 their fp32 outputs must differ in the last bits
    (other summation orders), which shows the switch took effect."""
    results = {}
    for baseline in ("0", "1"):
        env = {**os.environ, "SEGFORMER_FAST_CPU_BASELINE": baseline}
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / baseline)], env=env, capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        results[baseline] = json.loads(done.stdout.strip().splitlines()[-1])
    for baseline, errors in results.items():
        for dtype_name, (error, eager_error, max_ref) in errors.items():
            allowed = tolerance(torch.tensor([max_ref]), getattr(torch, dtype_name.split(".")[1]), eager_error)
            assert error <= allowed, (baseline, dtype_name, error, allowed)
    vectorized, baseline = (torch.load(tmp_path / f"{name}-torch.float32.pt") for name in ("0", "1"))
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert not torch.equal(vectorized, baseline)
