"""The grid of every kernel launch the engine makes, counted on the CPU (no kernel runs).

Each launcher computes its grid and tiles in a pure function (``linear_launch``, ``layer_norm_launch``,
``sr_kv_launches``, ``flash_sr_attention_launch``, ``mixffn_fc2_launches``). A launch should have at least a wave
of blocks (132, one per SM of an H100 / H200): here every launch of B0 and B5 at 512² and 1024x2048, batch 1 and
16, has that many, or it already has the most blocks its smallest tiles allow and says why in ``Launch.reason``.
The last tests check that the launchers launch exactly these grids, and that every configuration the engine can
pick compiles for sm_90 without spilling.
"""

import json
import os

import pytest
import torch

from segformer_fast.kernels import common
from segformer_fast.kernels.layernorm import layer_norm, layer_norm_launch, patch_embed_layer_norm
from segformer_fast.kernels.linear import linear_launch
from segformer_fast.kernels.mixffn import column_groups, mixffn, mixffn_fc2_launches
from segformer_fast.kernels.sr_attention import flash_sr_attention_launch, reduced_size, sr_attention, sr_kv_launches
from segformer_fast.model.config import NUM_HEADS, PATCH_SIZES, SR_RATIOS, STRIDES, VARIANTS
from segformer_fast.prepared.weights import prepare_mixffn_params, prepare_sr_attention_params

SHAPES = [(512, 512), (1024, 2048)]
BATCHES = [1, 16]


def stage_sizes(H, W):
    """(h, w) of each stage's tokens for an H x W image (the patch-embed convs' output sizes)."""
    sizes = []
    for kernel, stride in zip(PATCH_SIZES, STRIDES):
        H = (H + 2 * (kernel // 2) - kernel) // stride + 1
        W = (W + 2 * (kernel // 2) - kernel) // stride + 1
        sizes.append((H, W))
    return sizes


def engine_launches(variant, B, H, W, dtype):
    """(where, Launch) of every Triton launch of one forward (one block per stage: all blocks of a stage launch
    the same grids), in the engine's order (``SegformerEngine._forward`` with ``TritonOps``)."""
    dims, _, _ = VARIANTS[variant]
    launches = []
    for stage, ((h, w), C, heads, R) in enumerate(zip(stage_sizes(H, W), dims, NUM_HEADS, SR_RATIOS), start=1):
        N = h * w

        def add(what, launch, stage=stage):
            launches.append((f"{variant} stage {stage} {what}", launch))

        if stage == 1:
            add("patch-embed LayerNorm", layer_norm_launch(N, C, B, patch_embed=True))
        else:
            add("patch-embed LayerNorm", layer_norm_launch(B * N, C))
        add("LN1", layer_norm_launch(B * N, C))
        Hkv, Wkv = reduced_size(h, w, R)
        if R > 1:
            for launch in sr_kv_launches(B, Hkv * Wkv, C, R, dtype):
                add("sr_kv", launch)
        else:
            add("kv linear", linear_launch(B * N, 2 * C, C, dtype))
        attention = flash_sr_attention_launch(B, N, Hkv * Wkv, C, heads, C // heads, dtype)
        add("flash attention", attention)
        if not attention.meta["FUSE_OUT"]:
            add("output projection", linear_launch(B * N, C, C, dtype))
        add("LN2", layer_norm_launch(B * N, C))
        add("fc1", linear_launch(B * N, 4 * C, C, dtype))
        for launch in mixffn_fc2_launches(B * N, C, 4 * C, dtype):
            add("fc2", launch)
        add("stage LayerNorm", layer_norm_launch(B * N, C))
    return launches


def numbered(launches):
    """{(where, n): launch} with n counting repeats of a name (sr_kv's two launches)."""
    seen = {}
    for what, launch in launches:
        seen[(what, sum(key[0] == what for key in seen))] = launch
    return seen


def most_blocks(variant, B, H, W, dtype, monkeypatch):
    """The launches computed with an unreachable wave: each the configuration with the most blocks there is."""
    monkeypatch.setattr(common, "WAVE_BLOCKS", 10**12)
    try:
        return numbered(engine_launches(variant, B, H, W, dtype))
    finally:
        monkeypatch.setattr(common, "WAVE_BLOCKS", 132)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("H, W", SHAPES, ids=["512x512", "1024x2048"])
@pytest.mark.parametrize("variant", ["b0", "b5"])
def test_every_launch_has_a_wave_or_its_most_blocks(variant, H, W, B, dtype, monkeypatch):
    assert common.WAVE_BLOCKS == 132
    short = []
    most = most_blocks(variant, B, H, W, dtype, monkeypatch)
    for (what, n), launch in numbered(engine_launches(variant, B, H, W, dtype)).items():
        assert launch.blocks >= 1 and all(n >= 1 for n in launch.grid), (what, launch)
        if launch.blocks >= common.WAVE_BLOCKS:
            assert not launch.reason, (what, launch)
            continue
        assert launch.reason, f"{what}: {launch.blocks} blocks without a stated reason ({launch})"
        best = most[(what, n)]
        assert launch.blocks == best.blocks, (
            f"{what}: {launch.blocks} blocks, but its tiles allow {best.blocks} ({best.meta})")
        short.append(f"{what}: {launch.blocks} blocks ({launch.reason})")
    # fc2 splits its 4C reduction where its row blocks are short of a wave: no fc2 launch is an exception here
    assert not [line for line in short if " fc2: " in line], short
    print(f"\n{variant} {H}x{W} batch {B} {dtype}: {len(short)} launches short of a wave")
    print("\n".join(short))


def test_batch_one_launches_of_the_issue():
    """The launches the audit counted at B5 512² batch 1 (stage 3 sr_kv and attention 16 blocks, fc2 32 then 64,
    the output projection 48; stage 4 4-16) now fill a wave, or hold the most blocks their tiles allow."""
    launches = dict(engine_launches("b5", 1, 512, 512, torch.float16))
    sr_kv = [launch for what, launch in engine_launches("b5", 1, 512, 512, torch.float16)
             if what == "b5 stage 3 sr_kv"]
    assert [launch.kernel for launch in sr_kv] == ["_sr_patchify_kernel", "_sr_norm_kv_kernel"]
    assert sr_kv[0].grid == (16, 10, 1)  # 256 reduced tokens / 16 rows x 10 K splits of 40 K chunks
    attention = launches["b5 stage 3 flash attention"]
    assert attention.grid == (32, 5, 1) and not attention.meta["FUSE_OUT"]  # heads in the grid, BLOCK_M 32
    assert launches["b5 stage 3 output projection"].blocks >= 132
    assert launches["b5 stage 4 output projection"].blocks >= 132
    assert launches["b5 stage 4 flash attention"].grid == (16, 8, 1)  # 256 queries / 16 x 8 heads: 128
    fc2 = {stage: [launch for what, launch in engine_launches("b5", 1, 512, 512, torch.float16)
                   if what == f"b5 stage {stage} fc2"] for stage in (3, 4)}
    # 1024 tokens / 16 rows x 3 K splits of the 40 K chunks (1280 / 32); 256 / 16 x 9 splits of 64 chunks
    assert [(launch.kernel, launch.grid) for launch in fc2[3]] == [("_mixffn_fc2_kernel", (64, 3)),
                                                                    ("_mixffn_fc2_sum_kernel", (320,))]
    assert [(launch.kernel, launch.grid) for launch in fc2[4]] == [("_mixffn_fc2_kernel", (16, 9)),
                                                                    ("_mixffn_fc2_sum_kernel", (256,))]
    assert fc2[3][0].meta["BLOCK_M"] == fc2[4][0].meta["BLOCK_M"] == 16


@pytest.mark.parametrize("C", sorted({c for dims, _, _ in VARIANTS.values() for c in dims}))
def test_fc2_has_no_padded_columns_at_segformer_widths(C):
    hi, lo = column_groups(C)
    assert hi + lo == C and hi & (hi - 1) == 0 and (lo == 0 or lo & (lo - 1) == 0)
    for M in (16384, 256):  # one launch; split over K
        fc2 = mixffn_fc2_launches(M, C, 4 * C, torch.float16)[0]
        assert fc2.meta["SPLIT"] == (M == 256)
        # one block per row block (and K split) owns every column: GELU(dwconv) computed once
        assert fc2.grid[0] == -(-M // fc2.meta["BLOCK_M"]) and len(fc2.grid) == (2 if fc2.meta["SPLIT"] else 1)


def test_pick_launch_takes_the_largest_tiles_that_fill_a_wave():
    make = [common.Launch("k", (n,), {"T": t}, 4, 2) for t, n in ((64, 50), (32, 100), (16, 200), (8, 400))]
    assert common.pick_launch(make).meta == {"T": 16}
    assert common.pick_launch(make[:2]).meta == {"T": 32} and "100 blocks" in common.pick_launch(make[:2]).reason


def _stage_launches(record_launches, dtype):
    """Run the launchers at one small stage shape (recorded, not executed) and return (kernel, grid) pairs."""
    C, heads, R, B, H, W = 64, 2, 4, 2, 13, 10
    sr = prepare_sr_attention_params(*[torch.randn(*s) for s in
                                       ((C, C), (C,), (C, C), (C,), (C, C), (C,), (C, C), (C,),
                                        (C, C, R, R), (C,), (C,), (C,))], 1e-5, heads, dtype=dtype)
    mlp = prepare_mixffn_params(torch.randn(4 * C, C), torch.randn(4 * C), torch.randn(4 * C, 1, 3, 3),
                                torch.randn(4 * C), torch.randn(C, 4 * C), torch.randn(C), dtype=dtype)
    x = torch.randn(B, H * W, C, dtype=dtype)
    weight, bias = torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype)
    patch_embed_layer_norm(torch.randn(B, C, H, W, dtype=dtype), weight, bias, 1e-5)
    layer_norm(x, weight, bias, 1e-5)
    sr_attention(x, x, H, W, sr)
    mixffn(x, H, W, mlp, residual=x)
    return [(spec["name"], spec["grid"]) for spec in record_launches]


@pytest.mark.parametrize("wave", [1, 132])
def test_launchers_launch_the_computed_grids(record_launches, monkeypatch, wave):
    monkeypatch.setattr(common, "WAVE_BLOCKS", wave)
    dtype = torch.float16
    recorded = _stage_launches(record_launches, dtype)
    C, heads, R, B, H, W = 64, 2, 4, 2, 13, 10
    N, (Hkv, Wkv) = H * W, reduced_size(H, W, R)
    attention = flash_sr_attention_launch(B, N, Hkv * Wkv, C, heads, C // heads, dtype)
    expected = [layer_norm_launch(N, C, B, patch_embed=True), layer_norm_launch(B * N, C),
                *sr_kv_launches(B, Hkv * Wkv, C, R, dtype), attention]
    if not attention.meta["FUSE_OUT"]:
        expected.append(linear_launch(B * N, C, C, dtype))
    expected += [linear_launch(B * N, 4 * C, C, dtype), *mixffn_fc2_launches(B * N, C, 4 * C, dtype)]
    assert recorded == [(launch.kernel, launch.grid) for launch in expected]
    # both forms of sr_kv and of the attention are reached by the two waves
    kernels = [name for name, _ in recorded]
    if wave == 1:
        assert "_sr_kv_kernel" in kernels and "_linear_kernel" not in kernels[:4]  # output projection fused
    else:
        assert "_sr_patchify_kernel" in kernels and "_sr_norm_kv_kernel" in kernels


#: Inputs whose launches between them reach every configuration the launch functions pick for SegFormer: the
#: verify probe (2 x 67 x 91), tiny and odd images (1 reduced token, a single tile), the benchmark grid.
COVERAGE_SHAPES = [(2, 67, 91), (1, 64, 64), (1, 40, 56), (1, 512, 512), (16, 512, 512), (1, 1024, 2048),
                   (8, 1024, 2048), (1, 640, 640)]


def engine_configurations():
    """The distinct configurations (kernel, dtype, tiles, warps) the launch functions pick for B0 and B1-B5 over
    COVERAGE_SHAPES, each with one (variant, B, H, W, stage) that reaches it."""
    found = {}
    for variant in ("b0", "b5"):  # B1-B5 share their widths, heads and SR ratios
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for B, H, W in COVERAGE_SHAPES:
                for what, launch in engine_launches(variant, B, H, W, dtype):
                    stage = int(what.split(" stage ")[1][:1])
                    key = (launch.kernel, str(dtype), tuple(sorted(launch.meta.items())), launch.num_warps,
                           VARIANTS[variant][0][stage - 1], B == 1)
                    found.setdefault(key, (variant, B, H, W, dtype, what))
    return found


def test_the_configuration_set_is_finite_and_covered():
    configurations = engine_configurations()
    kernels = {key[0] for key in configurations}
    assert kernels == {"_layer_norm_kernel", "_linear_kernel", "_sr_kv_kernel", "_sr_patchify_kernel",
                       "_sr_norm_kv_kernel", "_flash_sr_attention_kernel", "_mixffn_fc2_kernel",
                       "_mixffn_fc2_sum_kernel"}
    fused = {dict(key[2])["FUSE_OUT"] for key in configurations if key[0] == "_flash_sr_attention_kernel"}
    assert fused == {True, False}
    split = {dict(key[2])["SPLIT"] for key in configurations if key[0] == "_mixffn_fc2_kernel"}
    assert split == {True, False}


def _run_engine_stages(variant, B, H, W, dtype, stages):
    """Call the launchers as the engine does for the given stages (recorded by record_launches)."""
    dims, _, _ = VARIANTS[variant]
    sizes = stage_sizes(H, W)
    for stage in stages:
        (h, w), C, heads, R = sizes[stage - 1], dims[stage - 1], NUM_HEADS[stage - 1], SR_RATIOS[stage - 1]
        weights = [torch.empty(*s) for s in ((C, C), (C,), (C, C), (C,), (C, C), (C,), (C, C), (C,))]
        weights += [torch.empty(C, C, R, R), torch.empty(C), torch.ones(C), torch.zeros(C)] if R > 1 else [None] * 4
        sr = prepare_sr_attention_params(*weights, 1e-5, heads, dtype=dtype)
        mlp = prepare_mixffn_params(torch.empty(4 * C, C), torch.empty(4 * C), torch.empty(4 * C, 1, 3, 3),
                                    torch.empty(4 * C), torch.empty(C, 4 * C), torch.empty(C), dtype=dtype)
        norm_w, norm_b = torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype)
        x = torch.empty(B, h * w, C, dtype=dtype)
        if stage == 1:
            patch_embed_layer_norm(torch.empty(B, C, h, w, dtype=dtype), norm_w, norm_b, 1e-5)
        layer_norm(x, norm_w, norm_b, 1e-5)
        if h >= R and w >= R:
            sr_attention(x, x, h, w, sr)
        mixffn(x, h, w, mlp, residual=x)


@pytest.fixture(scope="module")
def engine_specs(launch_recorder):
    """One recorded launch per configuration the engine can pick (``engine_configurations``, launched at a shape
    that reaches it), as the JIT specializes it. Launches that differ only in which integer arguments are divisible
    by 16 share a configuration: the one with the most divisible arguments (the widest vector loads) stands for it."""
    done = set()
    with launch_recorder() as launches:
        for variant, B, H, W, dtype, what in engine_configurations().values():
            stage = int(what.split(" stage ")[1][:1])
            if (variant, B, H, W, dtype, stage) not in done:
                done.add((variant, B, H, W, dtype, stage))
                _run_engine_stages(variant, B, H, W, dtype, [stage])
    chosen = {}
    for spec in launches:
        spec = {k: v for k, v in spec.items() if k != "grid"}
        key = json.dumps({k: v for k, v in spec.items() if k != "divisible"}, sort_keys=True)
        if key not in chosen or len(spec["divisible"]) > len(chosen[key]["divisible"]):
            chosen[key] = spec
    return list(chosen.values())


KERNELS = ["_layer_norm_kernel", "_linear_kernel", "_sr_kv_kernel", "_sr_patchify_kernel", "_sr_norm_kv_kernel",
           "_flash_sr_attention_kernel", "_mixffn_fc2_kernel", "_mixffn_fc2_sum_kernel"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_engine_configuration_compiles_for_sm90(engine_specs, compile_for_sm90, kernel):
    """Each configuration of one kernel that the engine can pick, compiled for sm_90 with the installed Triton: no
    spill in any dtype (fp32 included), shared memory within sm_90's."""
    assert {spec["name"] for spec in engine_specs} == set(KERNELS)
    specs = [spec for spec in engine_specs if spec["name"] == kernel]
    assert specs
    compile_for_sm90(specs, fp32_spills_fail=True)


def test_engine_configurations_compile_on_triton_36(engine_specs, compile_for_sm90):
    """The same on Triton 3.6 (the lent GPU machines' version), one configuration per (kernel, dtype, warps, fused
    output, column groups) to stay within about three minutes: set SEGFORMER_FAST_TRITON36 to a folder holding it
    (``pip install --no-deps --target DIR triton==3.6.*``)."""
    folder = os.environ.get("SEGFORMER_FAST_TRITON36")
    if not folder:
        pytest.skip("SEGFORMER_FAST_TRITON36 is not set (a folder with triton 3.6 installed by pip --target)")
    subset = {}
    for spec in engine_specs:
        pointers = sorted({kind for kind in spec["signature"].values() if kind.startswith("*")})
        shape = {k: spec["constexprs"].get(k) for k in ("FUSE_OUT", "C_LO", "R", "HAS_RESIDUAL", "SPLIT")}
        subset.setdefault(json.dumps([spec["name"], pointers, spec["num_warps"], shape], sort_keys=True), spec)
    compile_for_sm90(list(subset.values()), fp32_spills_fail=True, triton_path=folder, expect_version="3.6")
