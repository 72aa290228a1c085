"""Runner factories for the runtimes users deploy on instead of PyTorch; bench_model.py registers them, so they
run in the same process as the other runners (on CPU by default; name them with --runners elsewhere):

    python benchmarks/bench_model.py --variants b0,b2 --batch 1 --runners engine ort-ours ort-transformers \
        openvino-ours openvino-transformers

Each runner exports an ONNX file into a temporary folder, then times the runtime on it:

- ``ort-ours`` / ``openvino-ours``: segformer_fast.export_onnx of the engine's folded graph (dynamic shapes);
- ``ort-transformers`` / ``openvino-transformers``: transformers' SegformerForSemanticSegmentation with the same
  weights, exported as is by torch.onnx (dynamic shapes).

ONNX Runtime uses the CUDA / TensorRT execution providers when the device is CUDA and they are present, else the
CPU provider; OpenVINO runs on its CPU device (and on CUDA devices only through ONNX Runtime). onnxruntime and
openvino are optional (``pip install 'segformer-fast[runtimes]'``): a runner whose package is missing is skipped
with the reason.
"""

import tempfile
import warnings
from pathlib import Path

import torch

from segformer_fast.export.onnx import export_onnx, run_onnx
from segformer_fast.model.segformer import Segformer

from bench_common import RunnerUnavailable

_FOLDER = tempfile.TemporaryDirectory(prefix="segformer-fast-runtimes-")


def _model(variant, num_labels):
    """The benchmark's random weights (the same as the reference runner's)."""
    return Segformer.from_config(variant, num_labels=num_labels, seed=0).eval()


def _export(variant, num_labels, dtype, source) -> Path:
    """An ONNX file of our folded graph (source "ours") or of transformers' model ("transformers")."""
    path = Path(_FOLDER.name) / f"{variant}-{num_labels}-{dtype}-{source}.onnx"
    if path.exists():
        return path
    model = _model(variant, num_labels)
    if source == "ours":
        export_onnx(model, path, dtype=dtype)
        return path
    try:
        hf_model = model.to_transformers().to(dtype).eval()
    except ImportError as err:
        raise RunnerUnavailable(f"transformers is not importable ({err})") from None
    example = torch.randn(2, 3, 64, 96, dtype=dtype)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(_LogitsOnly(hf_model), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"},
                                        "logits": {0: "batch", 2: "logits_height", 3: "logits_width"}})
    return path


class _LogitsOnly(torch.nn.Module):
    """transformers' model returning its logits tensor (the exporter needs tensors out)."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, pixel_values):
        return self.hf_model(pixel_values=pixel_values).logits


def _ort_providers(device):
    import onnxruntime

    available = onnxruntime.get_available_providers()
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if device.type == "cuda" else []
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


def ort_factory(source):
    def factory(variant, num_labels, device, dtype):
        try:
            import onnxruntime
        except ImportError as err:
            raise RunnerUnavailable(f"onnxruntime is not importable ({err})") from None
        if dtype == torch.bfloat16:
            raise RunnerUnavailable("ONNX exports run in fp32 and fp16 (ONNX Conv has no bfloat16 before opset 22)")
        providers = _ort_providers(device)
        session = onnxruntime.InferenceSession(str(_export(variant, num_labels, dtype, source)),
                                               providers=providers)

        def run(pixel_values):
            return run_onnx(session, pixel_values)

        run.notes = f"onnxruntime {onnxruntime.__version__} {session.get_providers()[0]} on {source} ONNX export"
        return run

    return factory


def openvino_factory(source):
    def factory(variant, num_labels, device, dtype):
        try:
            import openvino
        except ImportError as err:
            raise RunnerUnavailable(f"openvino is not importable ({err})") from None
        if device.type != "cpu":
            raise RunnerUnavailable("OpenVINO runs here on its CPU device only")
        if dtype == torch.bfloat16:
            raise RunnerUnavailable("ONNX exports run in fp32 and fp16 (ONNX Conv has no bfloat16 before opset 22)")
        compiled = openvino.Core().compile_model(str(_export(variant, num_labels, dtype, source)), "CPU")

        def run(pixel_values):
            return torch.from_numpy(compiled(pixel_values.numpy())[0])

        run.notes = f"openvino {openvino.__version__} CPU on {source} ONNX export"
        return run

    return factory
