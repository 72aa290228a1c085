"""ONNX and torch.export exports of the prepared graph: run in onnxruntime / loaded back, against the reference.

Each variant and dtype is exported once (module-scoped fixtures); every check runs fresh random inputs at odd sizes
that are not the traced one (64 x 96), batch 2, through the written file and compares with the fp32 reference by
the tolerance rule of segformer_fast.core.numerics.
"""

import pytest
import torch

import segformer_fast
from segformer_fast.core.numerics import max_abs_error, tolerance
from segformer_fast.export.onnx import run_onnx
from segformer_fast.export.program import MIN_PROGRAM_SIDE
from segformer_fast.inference.processing import postprocess
from segformer_fast.model.segformer import Segformer

from helpers import assert_within_tolerance, random_transformers_model

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

#: Odd sizes, batch 2, never the traced (2, 3, 64, 96).
CHECK_SHAPES = ((2, 3, 45, 53), (2, 3, 33, 39))
LABELS = {"b0": 5, "b1": 9, "b2": 19}


def random_pixels(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1000 + seed))


def session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def models():
    return {variant: Segformer.from_config(variant, num_labels=labels, seed=7).eval()
            for variant, labels in LABELS.items()}


@pytest.fixture(scope="module")
def onnx_exports(models, tmp_path_factory):
    """{(variant, dtype): (path, report)}: one dynamic logits export per variant and dtype."""
    folder = tmp_path_factory.mktemp("onnx")
    exports = {}
    for variant, model in models.items():
        for dtype in (torch.float32, torch.float16):
            path = folder / f"{variant}-{dtype}.onnx"
            exports[variant, dtype] = path, segformer_fast.export_onnx(model, path, dtype=dtype)
    return exports


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", list(LABELS))
def test_onnx_matches_reference(models, onnx_exports, variant, dtype):
    model = models[variant]
    path, report = onnx_exports[variant, dtype]
    assert report["verified"] and report["dtype"] == dtype and len(report["checks"]) == 3
    assert all(check["max_abs_error"] <= check["tolerance"] for check in report["checks"])
    run = session(path)
    for seed, shape in enumerate(CHECK_SHAPES):
        pixels = random_pixels(shape, seed)
        with torch.no_grad():
            expected = model(pixels)
            eager = Segformer(model.config).to(dtype).eval()
            eager.load_state_dict(model.state_dict())
            eager = eager(pixels.to(dtype)).float() if dtype != torch.float32 else None
        got = run_onnx(run, pixels.to(dtype))
        assert got.dtype == dtype and got.shape == expected.shape
        assert_within_tolerance(got.float(), expected, dtype, eager=eager, what=f"{variant} ONNX {dtype} {shape}")


@pytest.mark.parametrize("height, width", [(28, 20), (17, 33), (9, 9), (1, 1), (5, 200)])
def test_dynamic_onnx_is_right_below_the_sr_ratios(models, onnx_exports, height, width):
    """Below 29 px stage grids are smaller than their SR ratio; the graph pads them to R as the reference does,
    with the padding computed from the input's shape inside the graph."""
    model = models["b1"]
    path, _ = onnx_exports["b1", torch.float32]
    pixels = random_pixels((2, 3, height, width), height * width)
    with torch.no_grad():
        expected = model(pixels)
    assert_within_tolerance(run_onnx(session(path), pixels), expected, torch.float32, what=f"ONNX at {height}x{width}")


def test_export_of_a_model_in_train_mode_leaves_it_unchanged(tmp_path):
    model = Segformer.from_config("b0", num_labels=3, seed=4).train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = segformer_fast.export_onnx(model, tmp_path / "t.onnx", dynamic=False, size=(40, 48))
    assert report["verified"]
    program_report = segformer_fast.export_program(model, tmp_path / "t.pt2", dynamic=False, size=(64, 64))
    assert program_report["verified"]
    assert all(module.training for module in model.modules()), "export switched the caller's model to eval mode"
    changed = [name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])]
    assert not changed, f"export changed the caller's model: {changed}"


def test_onnx_graph_has_standard_operators_only(onnx_exports):
    path, report = onnx_exports["b0", torch.float16]
    proto = onnx.load(str(path))
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    assert [entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")] == [17]
    ops = {node.op_type for node in proto.graph.node}
    assert "LayerNormalization" in ops and "Softmax" in ops and "Conv" in ops
    # fp32 statistics in the fp16 graph: every LayerNormalization and Softmax reads fp32 (a Cast feeds it)
    produced_by = {output: node for node in proto.graph.node for output in node.output}
    for node in proto.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            source = produced_by[node.input[0]]
            assert source.op_type == "Cast" and source.attribute[0].i == onnx.TensorProto.FLOAT, node.name


@pytest.fixture(scope="module")
def labels_export(models, tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "b0-labels.onnx"
    return path, segformer_fast.export_onnx(models["b0"], path, output="labels")


def test_onnx_labels_match_postprocess(models, labels_export):
    path, report = labels_export
    assert report["verified"] and report["output"] == "labels"
    model, run = models["b0"], session(path)
    for seed, shape in enumerate(CHECK_SHAPES):
        pixels = random_pixels(shape, seed)
        with torch.no_grad():
            logits = model(pixels)
        labels = run_onnx(run, pixels)
        assert labels.dtype == torch.uint8 and labels.shape == (shape[0], *shape[2:])
        expected = postprocess(logits, shape[2:])
        agreement = float((labels.long() == expected).double().mean())
        assert agreement >= 0.999, f"labels agree with postprocess on {agreement:.4%} of pixels"
        # ties aside: where the upsampled reference's top-2 margin is clear, the label must be the reference's
        upsampled = torch.nn.functional.interpolate(logits, size=shape[2:], mode="bilinear", align_corners=False)
        top2 = upsampled.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance(logits, torch.float32)
        assert torch.equal(labels.long()[clear], expected[clear])


def test_labels_dtype_int32_above_256_classes(tmp_path):
    model = Segformer.from_config("b0", num_labels=300, seed=2)
    path = tmp_path / "many.onnx"
    report = segformer_fast.export_onnx(model, path, output="labels", dynamic=False, size=(40, 36), batch=2)
    assert report["verified"] and report["checks"][0]["shape"] == (2, 3, 40, 36)
    labels = run_onnx(session(path), random_pixels((2, 3, 40, 36), 3))
    assert labels.dtype == torch.int32 and labels.shape == (2, 40, 36) and int(labels.max()) < 300


def test_fp16_onnx_survives_large_activations(tmp_path):
    """Stage-1 tokens of ~1e4 (the patch-embed conv scaled as in test_fp16_safety): fp16 statistics would overflow
    (x² > 65504); the fp16 graph keeps LayerNorm statistics and softmax in fp32 and stays within the rule."""
    model = Segformer.from_config("b0", num_labels=8, seed=3)
    with torch.no_grad():
        model.stages[0].patch_embed.proj.weight.mul_(5e3)
        model.stages[0].patch_embed.proj.bias.mul_(5e3)
    pixels = random_pixels((2, 3, 45, 61), 4)
    with torch.no_grad():
        tokens = model.stages[0].patch_embed.proj(pixels)
        expected = model(pixels)
        eager = Segformer(model.config).half().eval()
        eager.load_state_dict(model.state_dict())
        eager = eager(pixels.half()).float()
    assert float((tokens.double() ** 2).max()) > torch.finfo(torch.float16).max, "activations are not large enough"
    assert torch.isfinite(eager).all(), "the fp16 reference overflowed: the rule would be vacuous"
    path = tmp_path / "loud.onnx"
    segformer_fast.export_onnx(model, path, dtype=torch.float16)
    got = run_onnx(session(path), pixels.half()).float()
    assert torch.isfinite(got).all(), "the fp16 ONNX graph gave non-finite logits on large activations"
    assert_within_tolerance(got, expected, torch.float16, eager=eager, what="fp16 ONNX, tokens ~1e4")


def test_transformers_model_in(tmp_path):
    hf_model = random_transformers_model("b0", num_labels=6, seed=11)
    path = tmp_path / "hf.onnx"
    report = segformer_fast.export_onnx(hf_model, path)
    assert report["verified"]
    pixels = random_pixels(CHECK_SHAPES[0], 5)
    with torch.no_grad():
        expected = hf_model(pixel_values=pixels).logits
    assert_within_tolerance(run_onnx(session(path), pixels), expected, torch.float32, what="transformers in")


def test_engine_in(models, tmp_path):
    model = models["b0"]
    engine = segformer_fast.optimize(model, kernels="torch")
    path = tmp_path / "engine.onnx"
    report = segformer_fast.export_onnx(engine, path, reference=model)
    assert report["verified"]
    pixels = random_pixels(CHECK_SHAPES[1], 6)
    with torch.no_grad():
        expected = model(pixels)
    assert_within_tolerance(run_onnx(session(path), pixels), expected, torch.float32, what="engine in")
    with pytest.raises(ValueError, match="reference="):
        segformer_fast.export_onnx(engine, tmp_path / "no-reference.onnx")
    with pytest.raises(ValueError, match="float16"):
        segformer_fast.export_onnx(engine, tmp_path / "other-dtype.onnx", dtype=torch.float16, reference=model)
    assert not (tmp_path / "no-reference.onnx").exists()


def test_failed_verification_raises_and_writes_nothing(models, tmp_path):
    """An engine verified against another model's weights: the error gives the numbers, no file is left."""
    engine = segformer_fast.optimize(models["b0"], kernels="torch", verify=False)
    other = Segformer.from_config("b0", num_labels=LABELS["b0"], seed=8)
    path = tmp_path / "wrong.onnx"
    with pytest.raises(segformer_fast.ExportVerificationError, match="max abs error .* > tolerance"):
        segformer_fast.export_onnx(engine, path, reference=other, dynamic=False, size=(40, 40))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"opset": 16}, ValueError, "opset must be one of (17, 18, 19, 20)"),
    ({"opset": 21}, ValueError, "got 21"),
    ({"opset": 17.0}, ValueError, "got 17.0"),
    ({"opset": True}, ValueError, "got True"),
    ({"output": "probabilities"}, ValueError, "output must be one of ('logits', 'labels')"),
    ({"dtype": torch.bfloat16}, ValueError, "bfloat16"),
    ({"dtype": "fp64"}, ValueError, "dtype must be one of"),
    ({"size": (0, 32), "dynamic": False}, ValueError, "size must be (H, W)"),
], ids=["opset-16", "opset-21", "opset-float", "opset-bool", "output", "bf16", "fp64", "size"])
def test_export_onnx_argument_errors(models, tmp_path, kwargs, error, fragment):
    with pytest.raises(error) as info:
        segformer_fast.export_onnx(models["b0"], tmp_path / "x.onnx", **kwargs)
    assert fragment in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_export_bad_paths_and_models(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        segformer_fast.export_onnx(models["b0"], tmp_path / "missing" / "x.onnx")
    with pytest.raises(ValueError, match="must end in .onnx"):
        segformer_fast.export_onnx(models["b0"], tmp_path / "x.pt2")
    with pytest.raises(ValueError, match="must end in .pt2"):
        segformer_fast.export_program(models["b0"], tmp_path / "x.onnx")
    with pytest.raises(TypeError, match="got Linear"):
        segformer_fast.export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError, match="no program file"):
        segformer_fast.load_program(tmp_path / "absent.pt2")


def test_export_refuses_a_folder_it_cannot_write_before_any_work(models):
    """/proc holds no new files (for root too): the export fails on the path check, before tracing."""
    for export, name in ((segformer_fast.export_onnx, "x.onnx"), (segformer_fast.export_program, "x.pt2")):
        with pytest.raises(ValueError, match="creating a file in /proc failed"):
            export(models["b0"], f"/proc/{name}")


def test_program_round_trip_equals_engine(models, tmp_path):
    model = models["b0"]
    path = tmp_path / "b0.pt2"
    report = segformer_fast.export_program(model, path)
    assert report["verified"] and all(c["max_abs_error"] <= c["tolerance"] for c in report["checks"])
    program = segformer_fast.load_program(path)
    engine = segformer_fast.optimize(model, kernels="torch", verify=False)
    for seed, shape in enumerate(((2, 3, 77, 63), (1, 3, 61, 97))):
        pixels = random_pixels(shape, 20 + seed)
        with torch.no_grad():
            got, expected = program(pixels), model(pixels)
        assert_within_tolerance(got, expected, torch.float32, what=f"program {shape}")
        engine_logits = engine(pixels)
        assert max_abs_error(got, engine_logits) <= 1e-6 * float(engine_logits.abs().max()), "program != engine"
    with pytest.raises(ValueError, match=f"takes a height of at least {MIN_PROGRAM_SIDE}"):
        program(random_pixels((1, 3, MIN_PROGRAM_SIDE - 1, 80), 9))
    with pytest.raises(ValueError, match="takes a width of at least"):
        program(random_pixels((2, 3, 80, MIN_PROGRAM_SIDE - 1), 9))


def test_cli_export(tmp_path, capsys):
    from segformer_fast.cli import main

    checkpoint = tmp_path / "ckpt"
    Segformer.from_config("b0", num_labels=4, seed=12).save_pretrained(checkpoint)
    out = tmp_path / "b0.onnx"
    assert main(["export", "--model", str(checkpoint), "--onnx", str(out), "--labels", "--static", "40", "56"]) == 0
    printed = capsys.readouterr().out
    assert "verified" in printed and "(1, 3, 40, 56)" in printed and "agreement" in printed
    labels = run_onnx(session(out), random_pixels((1, 3, 40, 56), 1))
    assert labels.shape == (1, 40, 56) and labels.dtype == torch.uint8
    assert main(["export", "--model", str(checkpoint), "--onnx", str(tmp_path / "x.onnx"), "--opset", "12"]) == 2
    assert "opset" in capsys.readouterr().err
