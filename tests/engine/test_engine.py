"""segformer_fast.optimize against the reference, on CPU (torch ops, eager, Triton interpreter) and CUDA."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from segformer_fast import Segformer, postprocess, preprocess
from segformer_fast.engine.engine import VerificationError, optimize

from helpers import assert_relative_close, assert_within_tolerance, counting_calls, random_transformers_model

CUDA = torch.cuda.is_available()
ODD_SIZES = [(67, 93), (45, 101)]


@pytest.mark.parametrize("variant", ["b0", "b1", "b2"])
@pytest.mark.parametrize("kernels", ["auto", "eager"])
def test_optimize_segformer_matches_reference_fp32(variant, kernels):
    model = Segformer.from_config(variant, num_labels=11, seed=21)
    engine = optimize(model, kernels=kernels)
    generator = torch.Generator().manual_seed(3)
    for height, width in ODD_SIZES:
        pixels = torch.randn(2, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = model(pixels)
        got = engine(pixels)
        assert got.shape == expected.shape
        assert_relative_close(got, expected, 1e-5, f"{variant} {kernels} {height}x{width}")


@pytest.mark.parametrize("variant", ["b0", "b1", "b2"])
def test_optimize_transformers_model_is_drop_in(variant):
    transformers = pytest.importorskip("transformers")
    hf_model = random_transformers_model(variant, num_labels=9, seed=8)
    before = {k: v.clone() for k, v in hf_model.state_dict().items()}
    engine = optimize(hf_model)
    generator = torch.Generator().manual_seed(4)
    for height, width in ODD_SIZES:
        pixels = torch.randn(2, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = hf_model(pixel_values=pixels).logits
        output = engine(pixel_values=pixels)
        assert isinstance(output, transformers.modeling_outputs.SemanticSegmenterOutput)
        assert_relative_close(output.logits, expected, 1e-5, f"{variant} transformers drop-in {height}x{width}")
    after = hf_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "optimize() modified the transformers model"


def test_triton_kernels_in_interpreter_match_reference(monkeypatch):
    pytest.importorskip("triton")
    from segformer_fast.kernels import mixffn, sr_attention

    calls = {"sr_attention": 0, "mixffn": 0}
    for module in (sr_attention, mixffn):
        name = module.__name__.rsplit(".", 1)[-1]
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    model = Segformer.from_config("b0", num_labels=5, seed=2)
    device = "cuda" if CUDA else "cpu"
    model = model.to(device)
    engine = optimize(model, kernels="triton", verify=False, cuda_graphs=False)
    pixels = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(6)).to(device)
    with torch.no_grad():
        expected = model.double()(pixels.double())
    got = engine(pixels)
    assert_within_tolerance(got, expected, torch.float32, what="Triton engine vs reference")
    # 8 blocks in B0; stage 1 (H/4 = 16 >= R = 8) and every later stage run the Triton kernels at this size.
    assert calls == {"sr_attention": 8, "mixffn": 8}, calls


def test_triton_engine_small_grids_fall_back_per_block():
    """Below 29 px the stage-1 grid is smaller than the SR ratio: those blocks' attention runs the torch path
    (padded SR conv) while the others still run the Triton kernels; the result equals the reference."""
    pytest.importorskip("triton")
    from segformer_fast.kernels import sr_attention

    model = Segformer.from_config("b0", num_labels=5, seed=2)
    device = "cuda" if CUDA else "cpu"
    model = model.to(device)
    engine = optimize(model, kernels="triton", verify=False, cuda_graphs=False)
    pixels = torch.randn(2, 3, 20, 44, generator=torch.Generator().manual_seed(8)).to(device)
    with torch.no_grad():
        expected = model.double()(pixels.double())
    with counting_calls(sr_attention, "sr_attention") as calls:
        got = engine(pixels)
    assert_within_tolerance(got, expected, torch.float32, what="Triton engine at 20x44")
    assert calls["sr_attention"] > 0


def test_verify_catches_corrupted_prepared_weight():
    model = Segformer.from_config("b0", num_labels=4, seed=1)
    engine = optimize(model, verify=False)
    engine.verify(model)  # the good engine passes
    attn = engine.stages[0].blocks[1].attn
    channels = attn.q_weight.shape[0]
    with torch.no_grad():  # swap the k and v halves of the merged projection: a classic layout bug
        attn.kv_weight.copy_(torch.cat([attn.kv_weight[channels:], attn.kv_weight[:channels]]))
    # the forward runs on the backend's copy of the prepared weights (GEMM weights packed on CPU): remake it
    engine._run_stages, engine._run_decoder = engine.ops.prepare(engine.stages, engine.decoder)
    with pytest.raises(VerificationError, match=r"max abs error .* > tolerance .*"):
        engine.verify(model)
    engine = optimize(model, verify=False)
    with torch.no_grad():  # a decoder fold that forgot the BatchNorm shift in one channel
        engine.decoder.bias[3] += 0.5
    engine._run_stages, engine._run_decoder = engine.ops.prepare(engine.stages, engine.decoder)
    with pytest.raises(VerificationError, match=r"max abs error .* > tolerance .*"):
        engine.verify(model)


def test_verify_runs_the_reference_without_tf32_and_restores_the_flags():
    model = Segformer.from_config("b0", num_labels=4, seed=1)
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    seen = []
    hook = model.register_forward_hook(
        lambda module, args, output: seen.append((torch.backends.cudnn.allow_tf32,
                                                  torch.get_float32_matmul_precision())))
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        optimize(model)
        assert seen == [(False, "highest")], "verify ran the reference with TF32 allowed"
        assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == (True, "high")
    finally:
        hook.remove()
        torch.backends.cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def test_optimize_never_runs_or_changes_a_model_in_train_mode():
    model = Segformer.from_config("b0", num_labels=5, seed=4).train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    calls = []
    hook = model.register_forward_hook(lambda module, args, output: calls.append(module.training))
    engine = optimize(model)  # verify=True: passes against an eval-mode copy
    hook.remove()
    assert calls == [], "optimize() ran the caller's model"
    assert all(module.training for module in model.modules()), "optimize() changed the caller's training flag"
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before), "BatchNorm statistics or weights changed"
    assert engine.last_verification["max_abs_error"] <= engine.last_verification["tolerance"]
    engine.verify(model)  # a train-mode reference handed to verify directly is copied too
    assert all(module.training for module in model.modules())
    assert all(torch.equal(before[name], after[name]) for name in before)
    pixels = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    expected = model.eval()(pixels).detach()
    assert_relative_close(engine(pixels), expected, 1e-5, "engine of a train-mode model vs eval reference")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_optimize_rejects_non_finite_weights_naming_them(bad_value):
    model = Segformer.from_config("b0", num_labels=4, seed=1)
    with torch.no_grad():
        model.stages[1].blocks[0].attn.q.weight[0, 0] = bad_value
        model.decode_head.classifier.bias[2] = bad_value
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or Inf\) in 2 tensors: "
                                         r"stages\.1\.blocks\.0\.attn\.q\.weight, decode_head\.classifier\.bias"):
        optimize(model)


def test_optimize_rejects_non_finite_transformers_weights():
    pytest.importorskip("transformers")
    hf_model = random_transformers_model("b0", num_labels=3, seed=2)
    with torch.no_grad():
        hf_model.decode_head.classifier.weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values .* 1 tensors: decode_head\.classifier\.weight"):
        optimize(hf_model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_optimize_transformers_model_defaults_to_its_dtype(dtype):
    pytest.importorskip("transformers")
    hf_model = random_transformers_model("b0", num_labels=6, seed=5).to(dtype)
    engine = optimize(hf_model, kernels="eager")
    assert engine.dtype == dtype
    assert all(tensor.dtype == dtype for tensor in engine.decoder.__dict__.values() if torch.is_tensor(tensor))
    pixels = torch.randn(1, 3, 48, 40, generator=torch.Generator().manual_seed(7))
    assert engine(pixel_values=pixels).logits.dtype == dtype
    assert optimize(hf_model, dtype=torch.float32).dtype == torch.float32  # an explicit dtype still wins
    assert next(hf_model.parameters()).dtype == dtype


def test_optimize_rejects_bad_arguments(monkeypatch):
    model = Segformer.from_config("b0", num_labels=4, seed=1)
    with pytest.raises(ValueError, match="kernels must be one of"):
        optimize(model, kernels="fast")
    with pytest.raises(TypeError, match="Segformer"):
        optimize(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dtype must be one of"):
        optimize(model, dtype=torch.float64)
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            optimize(model, kernels="triton")
    engine = optimize(model, verify=False)
    with pytest.raises(ValueError, match="3 channels"):
        engine(torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError, match="floating"):
        engine(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    assert engine(torch.randn(0, 3, 33, 47)).shape == (0, 4, 9, 12)


def test_segment_returns_labels_at_each_image_size():
    model = Segformer.from_config("b0", num_labels=6, seed=9)
    engine = optimize(model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(70, 50), (33, 91)]]
    labels = engine.segment(images, size=(64, 64))
    with torch.no_grad():
        logits = model(preprocess(images, size=(64, 64)))
    for image, got, i in zip(images, labels, range(2)):
        expected = postprocess(logits[i:i + 1], (image.height, image.width))[0]
        assert got.shape == (image.height, image.width) and got.dtype == torch.int64
        agreement = float((got == expected).float().mean())
        assert agreement > 0.999, f"image {i}: only {agreement:.4f} of the labels agree with the reference"
    single = engine.segment(np.asarray(images[0]), size=(64, 64))
    assert torch.equal(single, labels[0])


def test_engine_is_thread_safe():
    model = Segformer.from_config("b0", num_labels=3, seed=13)
    engine = optimize(model)
    inputs = [torch.randn(1, 3, 40 + 8 * i, 56, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results, errors = [None] * 4, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = engine(inputs[i])
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        assert_relative_close(got, want, 1e-5, "threaded call")


# ------------------------------------------------------------------------------------------------------- CUDA
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the CPU variants above cover the logic)")


@needs_cuda
@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "b4", "b5"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_engine_512(variant, dtype):
    model = Segformer.from_config(variant, num_labels=150, seed=1).cuda()
    engine = optimize(model, dtype=dtype)
    pixels = torch.randn(2, 3, 512, 512, device="cuda")
    with torch.no_grad():
        expected = model(pixels)
        eager = Segformer.from_config(variant, num_labels=150, seed=1).cuda().to(dtype)(pixels.to(dtype))
    assert_within_tolerance(engine(pixels).float(), expected, dtype, eager=eager.float(), what=variant)


@needs_cuda
@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_cuda_engine_cityscapes(variant):
    model = Segformer.from_config(variant, num_labels=19, seed=1).cuda()
    engine = optimize(model, dtype=torch.float16)
    pixels = torch.randn(1, 3, 1024, 2048, device="cuda")
    with torch.no_grad():
        expected = model(pixels)
        eager = Segformer.from_config(variant, num_labels=19, seed=1).cuda().half()(pixels.half())
    assert_within_tolerance(engine(pixels).float(), expected, torch.float16, eager=eager.float(), what=variant)


@needs_cuda
def test_cuda_graph_replay_equals_plain_launch_and_recaptures():
    model = Segformer.from_config("b0", num_labels=150, seed=1).cuda()
    graphed = optimize(model, dtype=torch.float16, cuda_graphs=True, graph_cache_size=2)
    plain = optimize(model, dtype=torch.float16, cuda_graphs=False)
    for shape in [(1, 3, 512, 512), (2, 3, 256, 320), (1, 3, 512, 512)]:
        pixels = torch.randn(shape, device="cuda")
        assert torch.equal(graphed(pixels), plain(pixels))
    assert len(graphed.graph_cache.graphs) == 2
