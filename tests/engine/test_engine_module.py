"""The engine as a torch.nn.Module for inference: what code written for transformers' model calls on it (eval,
train(False), to / cpu / float to its own device and dtype, requires_grad_(False), parameters, device, dtype, config,
hooks) works and returns the engine; what it cannot do (train, gradients, another device or dtype, state dicts) is
refused with the way out, and the engine still runs unchanged afterwards."""

import pytest
import torch

from segformer_fast import Segformer, optimize

from helpers import assert_relative_close, random_transformers_model


@pytest.fixture(scope="module")
def model():
    return Segformer.from_config("b0", num_labels=7, seed=3)


@pytest.fixture(scope="module")
def engine(model):
    return optimize(model)


def _pixels(seed=0):
    return torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(seed))


def test_the_engine_is_a_module_whose_inference_calls_return_it(engine):
    pixels = _pixels()
    expected = engine(pixels)
    assert isinstance(engine, torch.nn.Module) and not engine.training
    for call in (engine.eval, lambda: engine.train(False), lambda: engine.to("cpu"), lambda: engine.to(torch.float32),
                 lambda: engine.to("cpu", torch.float32), engine.cpu, engine.float,
                 lambda: engine.requires_grad_(False)):
        assert call() is engine
    assert not engine.training
    assert torch.equal(engine(pixels), expected)
    assert (engine.device, engine.dtype, engine.config.num_labels) == (torch.device("cpu"), torch.float32, 7)
    assert repr(engine) == "SegformerEngine(MiT-B0, 7 classes, torch.float32 on cpu, torch kernels)"


def test_parameters_are_the_prepared_weights_frozen(engine, model):
    parameters = dict(engine.named_parameters())
    assert parameters and all(not p.requires_grad for p in parameters.values())
    first = next(engine.parameters())  # the idiom that finds a model's device and dtype
    assert (first.device, first.dtype) == (engine.device, engine.dtype)
    # they are the prepared tensors themselves (no copy): the attention scale is folded into q, k and v merged
    q_weight = parameters["prepared.stages.0.blocks.0.attn.q_weight"]
    assert q_weight.data_ptr() == engine.stages[0].blocks[0].attn.q_weight.data_ptr()
    assert parameters["prepared.stages.0.blocks.0.attn.kv_weight"].shape == (64, 32)
    assert parameters["prepared.decoder.cls_weight"].data_ptr() == engine.decoder.cls_weight.data_ptr()
    # every prepared tensor once; the folded decoder makes them fewer than the model's parameters
    assert sum(p.numel() for p in parameters.values()) < sum(p.numel() for p in model.parameters())


def test_outputs_carry_no_autograd_even_with_grad_enabled(engine):
    with torch.enable_grad():
        assert not engine(_pixels()).requires_grad


def test_forward_hooks_see_each_call(engine):
    seen = []
    handle = engine.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    try:
        engine(_pixels())
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 7, 16, 20])]


@pytest.mark.parametrize("move, asked", [
    (lambda e: e.to(torch.bfloat16), "torch.bfloat16 on cpu"),
    (lambda e: e.half(), "torch.float16 on cpu"),
    (lambda e: e.double(), "torch.float64 on cpu"),
    (lambda e: e.to("meta"), "torch.float32 on meta"),
])
def test_moving_to_another_device_or_dtype_is_refused_with_the_way_out(engine, move, asked):
    expected = engine(_pixels(1))
    with pytest.raises(ValueError, match=f"cannot move the engine to {asked}: it is built for torch.float32 on cpu") \
            as error:
        move(engine)
    assert "segformer_fast.optimize(model.to(device), dtype=dtype)" in str(error.value)
    assert (engine.device, engine.dtype) == (torch.device("cpu"), torch.float32)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in engine.parameters())
    assert torch.equal(engine(_pixels(1)), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_cuda_without_a_gpu_is_refused_the_same_way(engine):
    with pytest.raises(ValueError, match="cannot move the engine .*build another engine"):
        engine.cuda()


def test_training_and_gradients_are_refused(engine):
    with pytest.raises(RuntimeError, match="inference only"):
        engine.train()
    with pytest.raises(RuntimeError, match="frozen"):
        engine.requires_grad_()
    assert not engine.training and not any(p.requires_grad for p in engine.parameters())


def test_state_dicts_are_refused_pointing_at_the_source_model(engine):
    with pytest.raises(RuntimeError, match=r"not a checkpoint: save the source model"):
        engine.state_dict()
    with pytest.raises(RuntimeError, match=r"load the weights into the source model"):
        engine.load_state_dict({})


def test_transformers_code_runs_on_the_engine_unchanged():
    """What a transformers script does after loading: eval(), to(device), no_grad, pixel_values=..., .logits."""
    pytest.importorskip("transformers")
    hf_model = random_transformers_model("b0", num_labels=5, seed=2).eval()
    pixels = _pixels(2)
    with torch.no_grad():
        expected = hf_model(pixel_values=pixels).logits
    model = optimize(hf_model)
    model.eval()
    model = model.to("cpu")
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(pixel_values=pixels.to(device)).logits
    assert_relative_close(logits, expected, 1e-5, "the engine in a transformers script")
    assert model(pixel_values=pixels, return_dict=False)[0].shape == logits.shape
