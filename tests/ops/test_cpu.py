"""The CPU engine's own paths in segformer_fast.ops.cpu and their helpers: the oneDNN GEMM (``linear`` with plain
and packed weights, ``pack_linear_weight``), the row-blocked CPU attention, ``TorchOps.prepare`` and the glibc
malloc settings. Each result is checked against an fp64 reference with the tolerance rule
(segformer_fast.core.numerics)."""

import os
import platform
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from segformer_fast import Segformer
from segformer_fast.core.malloc_tuning import ENV_VAR, keep_freed_memory
from segformer_fast.engine.backends import EagerOps, TorchOps
from segformer_fast.engine.engine import optimize
from segformer_fast.ops import cpu, reference

from helpers import assert_within_tolerance

ONEDNN = cpu._ONEDNN_LINEAR
ONEDNN_BF16 = cpu._ONEDNN_BF16
DTYPES = [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not ONEDNN_BF16, reason="oneDNN has no bf16 GEMM on this CPU (torch.ops.mkldnn._is_mkldnn_bf16_supported)")),
]
NEEDS_ONEDNN = pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN linear (mkldnn::_linear_pointwise)")


def _ops_run(fn) -> set:
    """The names of the ops that ``fn()`` dispatches, read with the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


# --------------------------------------------------------------------------------------------------- linear


def _linear_input(layout: str, rows: int, in_features: int, generator):
    """x for the linear tests: "2d" (rows, K), "3d" (2, rows, K), or "transposed", a non-contiguous (2, rows, K)
    view of a (2, K, rows) tensor."""
    if layout == "2d":
        return torch.randn(rows, in_features, generator=generator)
    if layout == "3d":
        return torch.randn(2, rows, in_features, generator=generator)
    x = torch.randn(2, in_features, rows, generator=generator).transpose(1, 2)
    assert not x.is_contiguous()
    return x


@NEEDS_ONEDNN
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("layout", ["2d", "3d", "transposed"])
def test_linear_matches_fp64_reference(dtype, packed, with_bias, with_residual, layout):
    setting = f"{dtype} {packed} {with_bias} {with_residual} {layout}"
    generator = torch.Generator().manual_seed(zlib.crc32(setting.encode()))
    rows, in_features, out_features = 37, 96, 80
    x64 = _linear_input(layout, rows, in_features, generator).double()
    weight64 = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64) / in_features**0.5
    bias64 = torch.randn(out_features, generator=generator, dtype=torch.float64) if with_bias else None
    residual64 = torch.randn(*x64.shape[:-1], out_features, generator=generator, dtype=torch.float64) \
        if with_residual else None
    reference = F.linear(x64, weight64, bias64) + (residual64 if with_residual else 0)

    x = x64.to(dtype)  # keeps the transposed view's strides
    assert x.is_contiguous() == (layout != "transposed")
    weight = weight64.to(dtype)
    bias = None if bias64 is None else bias64.to(dtype)
    residual = None if residual64 is None else residual64.to(dtype)
    eager = F.linear(x, weight, bias) + (residual if with_residual else 0)
    run_weight = cpu.pack_linear_weight(weight) if packed else weight
    assert run_weight.is_mkldnn == packed

    got = cpu.linear(x, run_weight, bias, residual)
    assert got.shape == reference.shape and got.dtype == dtype
    assert_within_tolerance(got, reference, dtype, eager, what=f"linear {layout}")
    assert torch.equal(weight, weight64.to(dtype)), "linear changed its weight"


@NEEDS_ONEDNN
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_runs_on_onednn_for_cpu_fp32_and_bf16(dtype):
    x = torch.randn(8, 16, dtype=dtype)
    weight = torch.randn(4, 16, dtype=dtype)
    assert "mkldnn::_linear_pointwise" in _ops_run(lambda: cpu.linear(x, weight))
    fp64_ops = _ops_run(lambda: cpu.linear(x.double(), weight.double()))
    assert "mkldnn::_linear_pointwise" not in fp64_ops and "aten::linear" in fp64_ops


# --------------------------------------------------------------------------------------------------- packing


@NEEDS_ONEDNN
def test_pack_linear_weight_packs_cpu_fp32_and_leaves_the_rest():
    weight = torch.randn(24, 40)
    packed = cpu.pack_linear_weight(weight)
    assert packed.is_mkldnn and tuple(packed.shape) == (24, 40)
    assert not weight.is_mkldnn
    assert torch.equal(packed.to_dense(), weight), "packing changed the values"
    assert cpu.pack_linear_weight(packed) is packed, "a packed weight is packed again"
    for unpackable in (weight.double(), weight.half()):
        assert cpu.pack_linear_weight(unpackable) is unpackable
    assert cpu.pack_linear_weight(None) is None
    bf16 = weight.bfloat16()
    assert cpu.pack_linear_weight(bf16).is_mkldnn == ONEDNN_BF16


@NEEDS_ONEDNN
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_traced_linear_uses_standard_ops():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(12, 20, generator=generator)
    bias = torch.randn(12, generator=generator)
    x = torch.randn(3, 7, 20, generator=generator)

    def project(tokens):
        return cpu.linear(tokens, weight, bias)

    assert "mkldnn::_linear_pointwise" in _ops_run(lambda: project(x)), "outside tracing the GEMM is oneDNN's"
    traced = torch.jit.trace(project, x)
    assert "mkldnn" not in str(traced.graph)
    other = torch.randn(2, 5, 20, generator=generator)  # another shape through the traced graph
    reference = F.linear(other.double(), weight.double(), bias.double())
    assert_within_tolerance(traced(other), reference, torch.float32, F.linear(other, weight, bias), what="traced")


# --------------------------------------------------------------------------------------------------- attention


def _sdpa(q, kv, heads):
    """softmax(q kᵀ) v per head by scaled_dot_product_attention: q (B, N, C), kv (B, Nkv, 2C) -> (B, N, C)."""
    batch, tokens, channels = q.shape
    head_dim = channels // heads
    q_heads = q.view(batch, tokens, heads, head_dim).transpose(1, 2)
    kv_heads = kv.view(batch, -1, 2, heads, head_dim)
    k, v = kv_heads[:, :, 0].transpose(1, 2), kv_heads[:, :, 1].transpose(1, 2)
    out = F.scaled_dot_product_attention(q_heads, k, v, scale=1.0)
    return out.transpose(1, 2).reshape(batch, tokens, channels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("block", ["one-block", "row-blocks"])
def test_attention_by_row_chunks_matches_sdpa(monkeypatch, dtype, heads, block):
    batch, tokens, kv_tokens, head_dim = 2, 50, 7, 8
    if block == "row-blocks":
        # 16 query rows per block: blocks of 16, 16, 16 and a ragged 2
        monkeypatch.setattr(cpu, "_SCORE_BLOCK_ELEMENTS", 16 * kv_tokens)
    generator = torch.Generator().manual_seed(17 * heads + (block == "row-blocks"))
    channels = heads * head_dim
    q64 = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    kv64 = torch.randn(batch, kv_tokens, 2 * channels, generator=generator, dtype=torch.float64)
    reference = _sdpa(q64, kv64, heads)
    q, kv = q64.to(dtype), kv64.to(dtype)

    got = cpu.attention_by_row_chunks(q, kv, heads)
    assert got.shape == (batch, tokens, channels) and got.dtype == dtype
    assert_within_tolerance(got, reference, dtype, _sdpa(q, kv, heads), what=f"attention ({block})")


# --------------------------------------------------------------------------------------------------- prepare


GEMM_WEIGHTS = {"attn": ("q_weight", "kv_weight", "o_weight", "sr_weight"), "mlp": ("fc1_weight", "fc2_weight")}


def _gemm_weights(stages, decoder) -> dict:
    """{name: weight or None} of every GEMM weight in prepared stages and a folded decoder."""
    weights = {}
    for s, stage in enumerate(stages):
        for b, block in enumerate(stage.blocks):
            for part, names in GEMM_WEIGHTS.items():
                for name in names:
                    weights[f"stage{s}.block{b}.{part}.{name}"] = getattr(getattr(block, part), name)
    for s, weight in enumerate(decoder.weights):
        weights[f"decoder.weights[{s}]"] = weight
    return weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_prepare_packs_gemm_weights_and_keeps_the_originals(dtype):
    model = Segformer.from_config("b0", num_labels=7, seed=3)
    engine = optimize(model, dtype=dtype, kernels="torch", verify=False)
    originals = _gemm_weights(engine.stages, engine.decoder)
    snapshot = {name: None if w is None else w.clone() for name, w in originals.items()}
    assert snapshot["stage3.block0.attn.sr_weight"] is None  # stage 4 has no spatial reduction

    packed_stages, packed_decoder = TorchOps().prepare(engine.stages, engine.decoder)
    packable = ONEDNN and (dtype == torch.float32 or ONEDNN_BF16)
    for name, packed in _gemm_weights(packed_stages, packed_decoder).items():
        original = originals[name]
        if original is None:
            assert packed is None, name
            continue
        # the stage-1 decoder projection stays plain: extension.fused_decode_tokens takes it as it is
        assert packed.is_mkldnn == (packable and name != "decoder.weights[0]"), name
        assert torch.equal(packed.to_dense() if packed.is_mkldnn else packed, snapshot[name]), name
        assert not original.is_mkldnn and torch.equal(original, snapshot[name]), f"{name}: the original changed"
    # everything that is not a GEMM weight is shared, not copied
    assert packed_decoder.cls_weight is engine.decoder.cls_weight and packed_decoder.bias is engine.decoder.bias
    block, packed_block = engine.stages[0].blocks[0], packed_stages[0].blocks[0]
    assert packed_block.norm1 is block.norm1 and packed_block.attn.q_bias is block.attn.q_bias
    assert packed_block.mlp.dw_weight is block.mlp.dw_weight
    # stage 1's patch-embed weight as it is (NCHW image in), the later stages' channels-last like their inputs
    assert packed_stages[0].patch_weight is engine.stages[0].patch_weight
    for stage, packed_stage in zip(engine.stages[1:], packed_stages[1:]):
        assert packed_stage.patch_weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(packed_stage.patch_weight, stage.patch_weight) and stage.patch_weight.is_contiguous()

    eager_stages, eager_decoder = EagerOps().prepare(engine.stages, engine.decoder)
    assert eager_stages is engine.stages and eager_decoder is engine.decoder


# --------------------------------------------------------------------------------------------------- malloc


GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# -------------------------------------------------------------------------------------- depthwise conv + GELU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16, 16, 128), (2, 7, 5, 19), (1, 1, 6, 40), (3, 4, 1, 33)])
def test_dwconv_gelu_matches_fp64_and_runs_as_one_onednn_conv(dtype, shape):
    batch, height, width, channels = shape
    generator = torch.Generator().manual_seed(sum(shape))
    tokens = torch.randn(batch, height * width, channels, generator=generator, dtype=torch.float64)
    weight = torch.randn(channels, 1, 3, 3, generator=generator, dtype=torch.float64) / 3
    bias = 0.5 * torch.randn(channels, generator=generator, dtype=torch.float64)
    expected = reference.dwconv_gelu(tokens, height, width, weight, bias)  # fp64: nine shifted slices
    args = (tokens.to(dtype), height, width, weight.to(dtype), bias.to(dtype))
    got = cpu.dwconv_gelu(*args)
    assert got.dtype == dtype and got.shape == tokens.shape and got.is_contiguous()
    conv = F.conv2d(args[0].reshape(batch, height, width, channels).permute(0, 3, 1, 2), args[3], args[4], padding=1,
                    groups=channels)
    eager = F.gelu(conv.permute(0, 2, 3, 1).reshape(tokens.shape))  # the conv, then GELU, in the same dtype
    assert_within_tolerance(got, expected, dtype, eager)
    ops_run = _ops_run(lambda: cpu.dwconv_gelu(*args))
    if ONEDNN and hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        assert "mkldnn::_convolution_pointwise" in ops_run and "aten::gelu" not in ops_run


def test_traced_dwconv_gelu_uses_standard_ops():
    generator = torch.Generator().manual_seed(6)
    weight, bias = torch.randn(8, 1, 3, 3, generator=generator), torch.randn(8, generator=generator)
    tokens = torch.randn(1, 20, 8, generator=generator)
    traced = torch.jit.trace(lambda h: cpu.dwconv_gelu(h, 4, 5, weight, bias), tokens)
    assert "mkldnn" not in str(traced.graph) and "gelu" in str(traced.graph)
    assert torch.allclose(traced(tokens), cpu.dwconv_gelu(tokens, 4, 5, weight, bias), atol=1e-5)


#: Prints what keep_freed_memory() returned and whether a fresh 64 MiB malloc was mmap-ed (glibc's mallinfo2
#: counts mmap-ed blocks in hblks). glibc mmaps blocks above 32 MiB at most by default; tuned, the threshold is
#: 256 MiB and the block comes from the heap.
_MALLOC_PROBE = """
import ctypes
from segformer_fast.core.malloc_tuning import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = keep_freed_memory()
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
mmapped = libc.mallinfo2().hblks > before
libc.free(block)
print(applied, mmapped)
"""


def _malloc_probe(env_value):
    env = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    if env_value is not None:
        env[ENV_VAR] = env_value
    result = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="the malloc settings apply to glibc only")
def test_keep_freed_memory_applies_once_on_glibc():
    if os.environ.get(ENV_VAR) == "0":
        pytest.skip(f"{ENV_VAR}=0 in this test run's environment")
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent: the second call changes nothing and says the same


@pytest.mark.skipif(not GLIBC, reason="the malloc settings apply to glibc only")
def test_keep_freed_memory_changes_where_large_blocks_come_from():
    assert _malloc_probe(None) == ["True", "False"], "tuned: a 64 MiB block comes from the heap"
    assert _malloc_probe("0") == ["False", "True"], f"{ENV_VAR}=0: untouched, a 64 MiB block is mmap-ed"
