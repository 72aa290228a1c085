"""Runner factories for the runtimes users deploy on instead of PyTorch; bench_model.py registers them, so they
run in the same process as the other runners (ONNX Runtime and OpenVINO on CPU by default, TensorRT fp16 on CUDA;
name them with --runners elsewhere):

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


def tensorrt_factory(source="ours"):
    """TensorRT fp16 on the ONNX export (``trt-ours``): what a production GPU user would deploy instead. One engine
    is built per input shape on its first call (static shapes: the build is the row's first call), from the fp32
    export with the FP16 builder flag. Skipped with the reason where ``tensorrt`` is not importable, off CUDA, or
    in a dtype other than fp16."""

    def factory(variant, num_labels, device, dtype):
        try:
            import tensorrt as trt
        except ImportError as err:
            raise RunnerUnavailable(f"tensorrt is not importable ({err})") from None
        if device.type != "cuda":
            raise RunnerUnavailable("TensorRT runs on CUDA devices only")
        if dtype != torch.float16:
            raise RunnerUnavailable("the TensorRT runner is fp16 only (FP16 builder flag on the fp32 export)")
        onnx_bytes = _export(variant, num_labels, torch.float32, source).read_bytes()
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        contexts = {}

        def build(shape):
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse(onnx_bytes):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise RunnerUnavailable(f"TensorRT could not parse the ONNX export: {errors}")
            config = builder.create_builder_config()
            config.set_flag(trt.BuilderFlag.FP16)
            profile = builder.create_optimization_profile()
            profile.set_shape(network.get_input(0).name, shape, shape, shape)
            config.add_optimization_profile(profile)
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise RunnerUnavailable(f"TensorRT failed to build an engine for input {shape}")
            engine = runtime.deserialize_cuda_engine(serialized)
            context = engine.create_execution_context()
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            context.set_input_shape(inputs[0], shape)
            return engine, context, inputs[0], outputs[0]

        def run(pixel_values):
            shape = tuple(pixel_values.shape)
            if shape not in contexts:
                contexts[shape] = build(shape)
            _, context, input_name, output_name = contexts[shape]
            source_values = pixel_values.float().contiguous()  # the export's input is fp32
            out = torch.empty(tuple(context.get_tensor_shape(output_name)), dtype=torch.float32,
                              device=pixel_values.device)
            context.set_tensor_address(input_name, source_values.data_ptr())
            context.set_tensor_address(output_name, out.data_ptr())
            if not context.execute_async_v3(torch.cuda.current_stream(pixel_values.device).cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            return out.to(dtype)

        run.notes = f"TensorRT {trt.__version__} fp16 (FP16 builder flag) on our ONNX export"
        return run

    return factory
