"""segformer_fast._C decoder ops (fused_decode, upsample_argmax): references, checks, opcheck, torch.compile."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from segformer_fast.model.config import VARIANTS
from segformer_fast.ops import extension as ops

from helpers import assert_within_tolerance, poison_

needs_ext = pytest.mark.skipif(not ops.extension_available(), reason="segformer_fast._C is not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
needs_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops._has_kernel("fused_decode", torch.device("cuda"))),
    reason="no CUDA device or segformer_fast._C built without CUDA kernels",
)

# Stage-1..4 grids of a 123 x 77 image (odd, non-integer ratios) and of a 512 x 512 image.
ODD_SIZES = ((31, 20), (16, 10), (8, 5), (4, 3))
FULL_SIZES = ((128, 128), (64, 64), (32, 32), (16, 16))
NUM_LABELS = 150


def make_decode_inputs(variant, batch, dtype, sizes=ODD_SIZES, device="cpu", num_labels=NUM_LABELS, seed=0):
    """Projected maps P_i (B, h_i, w_i, D) as the folded projections make them from random stage features."""
    generator = torch.Generator().manual_seed(seed)
    dims, _, dim = VARIANTS[variant]
    maps = []
    for c, (h, w) in zip(dims, sizes):
        feature = torch.randn(batch, h, w, c, generator=generator, dtype=torch.float64)
        weight = torch.randn(dim, c, generator=generator, dtype=torch.float64) / c**0.5
        maps.append((feature @ weight.t()).to(device=device, dtype=dtype).contiguous())
    bias = (0.5 * torch.randn(dim, generator=generator, dtype=torch.float64)).to(device=device, dtype=dtype)
    cls_weight = (torch.randn(num_labels, dim, generator=generator, dtype=torch.float64) / dim**0.5).to(device, dtype)
    cls_bias = (0.1 * torch.randn(num_labels, generator=generator, dtype=torch.float64)).to(device, dtype)
    return maps, bias, cls_weight, cls_bias


def fused_decode_reference(maps, bias, cls_weight, cls_bias, dtype=torch.float64):
    """The eager composition in `dtype` (fp64: the reference; the inputs' dtype: "eager in the same dtype")."""
    size = maps[0].shape[1:3]
    total = None
    for p in maps:
        image = p.to(dtype).permute(0, 3, 1, 2)
        if image.shape[2:] != size:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        total = image if total is None else total + image
    hidden = torch.relu(total + bias.to(dtype)[:, None, None])
    logits = torch.einsum("bdhw,kd->bkhw", hidden, cls_weight.to(dtype))
    return logits + cls_bias.to(dtype)[:, None, None]


def check_fused_decode(maps, bias, cls_weight, cls_bias, what):
    dtype = maps[0].dtype
    out = ops.fused_decode(*maps, bias, cls_weight, cls_bias)
    assert out.dtype == dtype and out.is_contiguous()
    assert out.shape == (maps[0].shape[0], cls_weight.shape[0], *maps[0].shape[1:3])
    reference = fused_decode_reference(maps, bias, cls_weight, cls_bias).cpu()
    eager = fused_decode_reference(maps, bias, cls_weight, cls_bias, dtype=dtype)
    assert_within_tolerance(out.cpu(), reference, dtype, eager=eager.cpu(), what=what)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_decode_cpu(variant, dtype):
    maps, bias, cls_weight, cls_bias = make_decode_inputs(variant, batch=3, dtype=dtype)
    check_fused_decode(maps, bias, cls_weight, cls_bias, f"fused_decode {variant} {dtype}")


@needs_ext
@pytest.mark.parametrize(
    "sizes",
    [
        ((7, 9), (7, 9), (7, 9), (7, 9)),  # equal sizes: up_i is the identity
        ((13, 6), (1, 1), (2, 5), (5, 1)),  # 1 x 1 and 1-wide maps (edge clamping), mixed ratios
        ((5, 4), (9, 11), (3, 3), (2, 2)),  # a stage larger than the output (downsampling)
        ((3, 300), (2, 150), (1, 75), (1, 38)),  # one long row block: tasks of several rows
    ],
)
def test_fused_decode_cpu_edge_shapes(sizes):
    for dtype in (torch.float32, torch.bfloat16):
        maps, bias, cls_weight, cls_bias = make_decode_inputs("b0", batch=2, dtype=dtype, sizes=sizes, num_labels=19)
        check_fused_decode(maps, bias, cls_weight, cls_bias, f"fused_decode {sizes} {dtype}")


@needs_ext
def test_fused_decode_kernel_matches_fallback():
    maps, bias, cls_weight, cls_bias = make_decode_inputs("b2", batch=2, dtype=torch.float32)
    kernel = torch.ops.segformer_fast.fused_decode(*maps, bias, cls_weight, cls_bias)
    fallback = ops.fused_decode_eager(*maps, bias, cls_weight, cls_bias)
    assert_within_tolerance(kernel, fallback.double(), torch.float32, what="kernel vs fallback")


def upsample_argmax_reference(logits, height, width):
    """The rule for every dtype: the argmax of the bilinear interpolation computed in fp32."""
    return F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False).argmax(1)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_upsample_argmax_exact_cpu(variant, dtype):
    """Bit-identical to eager F.interpolate(logits.float()).argmax(1) (output H + W > 128, where eager uses its
    generic bilinear kernel, i.e. every real segmentation size)."""
    maps, bias, cls_weight, cls_bias = make_decode_inputs(variant, batch=3, dtype=dtype)
    logits = ops.fused_decode(*maps, bias, cls_weight, cls_bias)
    for height, width in ((123, 77), (61, 90), (31, 120)):
        labels = ops.upsample_argmax(logits, height, width)
        assert labels.dtype == torch.int64 and labels.shape == (3, height, width)
        expected = upsample_argmax_reference(logits, height, width)
        assert torch.equal(labels, expected), f"{int((labels != expected).sum())} labels differ"


@needs_ext
def test_upsample_argmax_against_fp64():
    """Every chosen label is a maximum of the fp64 upsampled logits up to fp32 rounding."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 150, 17, 23, generator=generator)
    for height, width in ((67, 91), (40, 40), (17, 23), (9, 200)):
        labels = ops.upsample_argmax(logits, height, width)
        up = F.interpolate(logits.double(), size=(height, width), mode="bilinear", align_corners=False)
        chosen = up.gather(1, labels[:, None]).squeeze(1)
        assert float((up.max(1).values - chosen).max()) <= 1e-5


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_upsample_argmax_over_random_shapes(dtype):
    """300 random odd shapes and sizes (up and down): the labels equal the argmax of the fp32 interpolation of the
    logits bit for bit where eager runs its generic kernel (H + W > 128), and elsewhere pick a label whose fp64
    upsampled value is within fp32 rounding of the best one."""
    generator = torch.Generator().manual_seed(11)
    mismatches = 0
    for _ in range(300):
        batch, labels_count, in_h, in_w, out_h, out_w = (
            int(torch.randint(low, high, (1,), generator=generator))
            for low, high in ((1, 3), (2, 24), (1, 19), (1, 23), (1, 150), (1, 150)))
        logits = torch.randn(batch, labels_count, in_h, in_w, generator=generator).to(dtype)
        labels = ops.upsample_argmax(logits, out_h, out_w)
        assert labels.shape == (batch, out_h, out_w) and labels.dtype == torch.int64
        if out_h + out_w > 128:
            mismatches += int((labels != upsample_argmax_reference(logits, out_h, out_w)).sum())
        up = F.interpolate(logits.double(), size=(out_h, out_w), mode="bilinear", align_corners=False)
        gap = up.max(1).values - up.gather(1, labels[:, None]).squeeze(1)
        assert float(gap.max()) <= 1e-5 * max(float(up.abs().max()), 1.0)
    assert mismatches == 0, f"{mismatches} labels differ from F.interpolate(logits.float()).argmax(1)"


@needs_ext
def test_upsample_argmax_small_outputs():
    """Outputs with H + W <= 128 make eager use its channels-last kernel, whose sum order differs from the generic
    one; labels may then differ only where the two best fp64 values are within rounding of each other."""
    generator = torch.Generator().manual_seed(4)
    for dtype, slack in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        logits = torch.randn(3, 19, 7, 5, generator=generator).to(dtype)
        labels = ops.upsample_argmax(logits, 30, 20)
        expected = upsample_argmax_reference(logits, 30, 20)
        up = F.interpolate(logits.double(), size=(30, 20), mode="bilinear", align_corners=False)
        gap = (up.gather(1, labels[:, None]) - up.gather(1, expected[:, None])).abs().squeeze(1)
        assert float(gap.max()) <= slack * float(up.abs().max())


@needs_ext
def test_upsample_argmax_ties_and_nan():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 5, 7, generator=generator)
    logits[:, 4] = logits[:, 1]  # exact duplicates: the first index wins
    logits[:, 5] = logits[:, 1]
    labels = ops.upsample_argmax(logits, 50, 90)
    assert torch.equal(labels, upsample_argmax_reference(logits, 50, 90))
    constant = torch.full((1, 4, 3, 3), 2.5)
    assert int(ops.upsample_argmax(constant, 70, 70).max()) == 0
    with_nan = torch.randn(1, 5, 4, 4, generator=generator)
    with_nan[0, 3, 1, 1] = float("nan")
    assert torch.equal(ops.upsample_argmax(with_nan, 64, 80), upsample_argmax_reference(with_nan, 64, 80))


@needs_ext
def test_opcheck():
    maps, bias, cls_weight, cls_bias = make_decode_inputs("b0", batch=2, dtype=torch.float32, num_labels=11)
    torch.library.opcheck(torch.ops.segformer_fast.fused_decode.default, (*maps, bias, cls_weight, cls_bias))
    logits = torch.randn(2, 11, 9, 7)
    torch.library.opcheck(torch.ops.segformer_fast.upsample_argmax.default, (logits, 35, 27))


@needs_ext
def test_torch_compile_fullgraph():
    maps, bias, cls_weight, cls_bias = make_decode_inputs("b0", batch=1, dtype=torch.float32, num_labels=5)

    def decode(p1, p2, p3, p4, b, w, c):
        logits = ops.fused_decode(p1, p2, p3, p4, b, w, c)
        return logits, ops.upsample_argmax(logits * 2.0, 123, 77)

    compiled = torch.compile(decode, fullgraph=True, dynamic=False)
    logits, labels = compiled(*maps, bias, cls_weight, cls_bias)
    expected_logits, expected_labels = decode(*maps, bias, cls_weight, cls_bias)
    assert torch.equal(logits, expected_logits)
    assert torch.equal(labels, expected_labels)


# ---------------------------------------------------------------------------------------------------------------
# Input checks (the CPU kernel's TORCH_CHECKs and the fake impl's checks carry the same messages).


def _fused_inputs():
    maps, bias, cls_weight, cls_bias = make_decode_inputs("b0", batch=2, dtype=torch.float32, num_labels=7)
    return list(maps) + [bias, cls_weight, cls_bias]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(1, a[1][0]), "p2 must be a 4-D channels-last (B, h, w, D) map, got a 3-D"),
        (lambda a: a.__setitem__(2, a[2][..., :100].contiguous()), "channel mismatch: p3 has D=100"),
        (lambda a: a.__setitem__(3, a[3][:1].contiguous()), "batch mismatch: p4 has B=1 but p1 has B=2"),
        (lambda a: a.__setitem__(4, a[4][:-1]), "bias must have shape (D,) = (256,)"),
        (lambda a: a.__setitem__(5, a[5][:, :-2].contiguous()),
         "cls_weight has shape [7, 254], expected (K, D) with D=256"),
        (lambda a: a.__setitem__(5, a[5][None]), "cls_weight must be 2-D (K, D), got a 3-D"),
        (lambda a: a.__setitem__(6, a[6][:3]), "cls_bias must have shape (K,) = (7,)"),
        (lambda a: a.__setitem__(2, a[2].to(torch.bfloat16)), "dtype mismatch: p3 is"),
        (lambda a: a.__setitem__(5, a[5].double()), "dtype mismatch: cls_weight is"),
        (lambda a: a.__setitem__(0, a[0].transpose(1, 2)), "p1 must be contiguous"),
        (lambda a: [a.__setitem__(i, a[i].double()) for i in range(7)], "expected float32, float16 or bfloat16"),
    ],
)
@pytest.mark.parametrize("path", ["op", "fallback"])
def test_fused_decode_input_checks(mutate, message, path):
    if path == "op" and not ops.extension_available():
        pytest.skip("segformer_fast._C is not built")
    args = _fused_inputs()
    mutate(args)
    fn = torch.ops.segformer_fast.fused_decode if path == "op" else ops.fused_decode_eager
    with pytest.raises(RuntimeError) as info:
        fn(*args)
    assert message in str(info.value)


@needs_ext
def test_fused_decode_device_mix():
    args = _fused_inputs()
    args[4] = args[4].to("meta")
    with pytest.raises(RuntimeError, match="device mismatch: bias is on meta but p1 is on cpu"):
        torch.ops.segformer_fast.fused_decode(*args)


@needs_cuda_ext
def test_fused_decode_device_mix_cuda():
    args = _fused_inputs()
    args[2] = args[2].cuda()
    with pytest.raises(RuntimeError, match="device mismatch"):
        torch.ops.segformer_fast.fused_decode(*args)


@pytest.mark.parametrize(
    "logits, size, message",
    [
        (torch.randn(3, 4, 5), (8, 8), "logits must be 4-D (B, K, h, w), got a 3-D"),
        (torch.randn(1, 3, 4, 5).transpose(2, 3), (8, 8), "logits must be contiguous"),
        (torch.randn(1, 3, 4, 5).double(), (8, 8), "expected float32, float16 or bfloat16 logits"),
        (torch.randn(1, 3, 4, 5), (0, 8), "output size must be positive"),
    ],
)
@pytest.mark.parametrize("path", ["op", "fallback"])
def test_upsample_argmax_input_checks(logits, size, message, path):
    if path == "op" and not ops.extension_available():
        pytest.skip("segformer_fast._C is not built")
    fn = torch.ops.segformer_fast.upsample_argmax if path == "op" else ops.upsample_argmax_eager
    with pytest.raises(RuntimeError) as info:
        fn(logits, *size)
    assert message in str(info.value)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(ops, "_EXTENSION_ERROR", ImportError("simulated: not built"))
    monkeypatch.setattr(ops, "_KERNEL_DEVICES", {"fused_decode": frozenset(), "upsample_argmax": frozenset()})
    monkeypatch.setattr(ops, "_warned", False)
    maps, bias, cls_weight, cls_bias = make_decode_inputs("b0", batch=1, dtype=torch.float32, num_labels=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = ops.fused_decode(*maps, bias, cls_weight, cls_bias)
        ops.fused_decode(*maps, bias, cls_weight, cls_bias)
        labels = ops.upsample_argmax(logits, 123, 77)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated: not built" in messages[0] and "eager" in messages[0]
    assert not ops.extension_available()
    reference = fused_decode_reference(maps, bias, cls_weight, cls_bias)
    assert_within_tolerance(logits, reference, torch.float32)
    assert torch.equal(labels, upsample_argmax_reference(logits, 123, 77))


# ---------------------------------------------------------------------------------------------------------------
# CUDA: the same checks at full sizes. Outputs are poisoned through the caching allocator: a NaN-filled block of
# the output's size is freed right before the call, so the kernel's output reuses it and unwritten elements fail.


def _poison_next_allocation(shape, dtype, device="cuda"):
    poison_(torch.empty(shape, dtype=dtype, device=device))


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_decode_cuda(variant, dtype):
    for sizes in (FULL_SIZES, ODD_SIZES):
        maps, bias, cls_weight, cls_bias = make_decode_inputs(variant, batch=3, dtype=dtype, sizes=sizes, device="cuda")
        _poison_next_allocation((3, NUM_LABELS, *sizes[0]), dtype)
        check_fused_decode(maps, bias, cls_weight, cls_bias, f"cuda fused_decode {variant} {dtype} {sizes[0]}")


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_upsample_argmax_cuda(dtype):
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(3, NUM_LABELS, 128, 128, generator=generator).to("cuda", dtype)
    for height, width in ((512, 512), (509, 515), (123, 77)):
        _poison_next_allocation((3, height, width), torch.int64)
        labels = ops.upsample_argmax(logits, height, width)
        expected = upsample_argmax_reference(logits, height, width)
        up = F.interpolate(logits.double(), size=(height, width), mode="bilinear", align_corners=False)
        gap = (up.gather(1, labels[:, None]) - up.gather(1, expected[:, None])).abs()
        # Same formula as PyTorch's CUDA kernel; only FMA contraction choices of the two builds could differ.
        assert float(gap.max()) <= (1e-5 if dtype == torch.float32 else 2e-2) * float(up.abs().max())
        if dtype == torch.float32:
            assert float((labels != expected).float().mean()) < 1e-4
