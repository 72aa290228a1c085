"""Runner factories for the runtimes users deploy on instead of PyTorch; bench_model.py registers them, so they
run in the same process as the other runners (ONNX Runtime and OpenVINO, fp32 and int8, on CPU by default, TensorRT
fp16 on CUDA; name them with --runners elsewhere):

    python benchmarks/bench_model.py --variants b0,b2 --batch 1 --runners engine ort-ours ort-transformers \
        openvino-ours openvino-transformers ort-ours-int8 openvino-ours-int8

Each runner exports an ONNX file into a temporary folder, then times the runtime on it:

- ``ort-ours`` / ``openvino-ours``: segformer_fast.export_onnx of the engine's folded graph (dynamic shapes);
- ``ort-transformers`` / ``openvino-transformers``: transformers' SegformerForSemanticSegmentation with the same
  weights, exported as is by torch.onnx (dynamic shapes);
- ``ort-ours-int8`` / ``openvino-ours-int8``: our fp32 export quantized to int8 on the row's first call (ONNX
  Runtime static QDQ quantization; NNCF post-training quantization), in fp32 rows only.

OpenVINO gets ``INFERENCE_PRECISION_HINT`` explicitly: "f32" in fp32 rows, "bf16" in bf16 rows (on the fp32 export;
skipped where its CPU device has no native bf16). ONNX Runtime has no bf16 row (no bf16 kernels for this graph in
its CPU provider). ONNX Runtime uses the CUDA / TensorRT execution providers when the device is CUDA and they are
present, else the CPU provider; OpenVINO runs on its CPU device (and on CUDA devices only through ONNX Runtime).
onnxruntime, openvino and nncf are optional (the ``runtimes`` extra): a runner whose package is
missing is skipped with the reason.
"""

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import torch

from segformer_fast.export.onnx import CONSTANT_FOLDING_NOTE, export_onnx, run_onnx
from segformer_fast.model.segformer import Segformer

from .harness import RunnerUnavailable, cpu_isa, one_line

_FOLDER = tempfile.TemporaryDirectory(prefix="segformer-fast-runtimes-")
#: Why ONNX Runtime has no bf16 row on a CPU: checked with onnxruntime 1.32, whose CPU provider answers
#: NOT_IMPLEMENTED for bfloat16 Conv, MatMul, Add, Softmax and Erf (it has a bfloat16 LayerNormalization only).
ORT_CPU_NO_BF16 = ("ONNX Runtime's CPU execution provider has no bfloat16 kernels for this graph's Conv, MatMul, "
                   "Add, Softmax and Erf")
NO_BF16_EXPORT = "ONNX exports run in fp32 and fp16 (ONNX Conv has no bfloat16 before opset 22)"


#: What onnxruntime's quantize_static logs (on the root logger, once per weight) for every 1-D weight (LayerNorm
#: scales and biases), which has no axis 1 to quantize per channel along: it quantizes those per tensor, as it should.
_PER_TENSOR_FALLBACK = "is out-of-range for weight"


class _DropMessages(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _without_root_log(text: str):
    """The root logger's records containing ``text`` dropped while the block runs."""
    dropping = _DropMessages(text)
    logging.getLogger().addFilter(dropping)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(dropping)


def _dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


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
        warnings.filterwarnings("ignore", message=CONSTANT_FOLDING_NOTE, category=UserWarning)  # (export.onnx)
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


def _ort_session(path: Path, providers: list):
    """An ONNX Runtime session whose intra-op threads stop spinning when a Run returns
    (``session.force_spinning_stop``): they spin within a Run as by default, but not on the CPUs after it, where
    they took half the 2-core machine from whichever runner came next in an interleaved round (measured: the
    reference at 128x128 took 63 ms instead of 24 ms right after an ONNX Runtime call, 23 ms with the option)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return onnxruntime.InferenceSession(str(path), options, providers=providers)


def ort_factory(source):
    def factory(variant, num_labels, device, dtype):
        try:
            import onnxruntime
        except ImportError as err:
            raise RunnerUnavailable(f"onnxruntime is not importable ({err})") from None
        if dtype == torch.bfloat16:
            raise RunnerUnavailable(ORT_CPU_NO_BF16 if device.type == "cpu" else NO_BF16_EXPORT)
        providers = _ort_providers(device)
        session = _ort_session(_export(variant, num_labels, dtype, source), providers)

        def run(pixel_values):
            return run_onnx(session, pixel_values)

        run.notes = (f"onnxruntime {onnxruntime.__version__} {session.get_providers()[0]} on {source} ONNX export, "
                     "session.force_spinning_stop=1")
        return run

    return factory


def openvino_factory(source):
    """OpenVINO on its CPU device, with ``INFERENCE_PRECISION_HINT`` set for the row's dtype: "f32" in fp32 rows
    (left alone, OpenVINO runs an fp32 graph in bf16 on CPUs with native bf16, so the row would not be fp32) and
    "bf16" in bf16 rows (the fp32 export, bf16 inside; skipped where the CPU device lacks native bf16). fp16 rows run
    the fp16 export with OpenVINO's own choice, as before; the notes say what it chose."""

    def factory(variant, num_labels, device, dtype):
        try:
            import openvino
        except ImportError as err:
            raise RunnerUnavailable(f"openvino is not importable ({err})") from None
        if device.type != "cpu":
            raise RunnerUnavailable("OpenVINO runs here on its CPU device only")
        core = openvino.Core()
        hint, export_dtype = {torch.float32: ("f32", torch.float32), torch.bfloat16: ("bf16", torch.float32)}.get(
            dtype, (None, dtype))
        if hint == "bf16":
            capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
            if "BF16" not in capabilities:
                raise RunnerUnavailable(f"OpenVINO's CPU device has no native bf16 on this CPU "
                                        f"(OPTIMIZATION_CAPABILITIES: {' '.join(capabilities)})")
        compiled = core.compile_model(str(_export(variant, num_labels, export_dtype, source)), "CPU",
                                      {"INFERENCE_PRECISION_HINT": hint} if hint else {})

        def run(pixel_values):
            values = pixel_values.float() if export_dtype == torch.float32 else pixel_values  # numpy has no bf16
            return torch.from_numpy(compiled(values.numpy())[0]).to(dtype)

        chosen = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # what OpenVINO will run
        run.notes = (f"openvino {openvino.__version__} CPU on {source} ONNX export ({_dtype_name(export_dtype)}), "
                     + (f"INFERENCE_PRECISION_HINT={hint}" if hint else f"INFERENCE_PRECISION_HINT not set "
                        f"(OpenVINO chose {chosen})"))
        return run

    return factory


def _int8_checks(device, dtype) -> None:
    """The int8 runners run in the fp32 row on the CPU only: fp32 in, fp32 out, int8 inside."""
    if device.type != "cpu":
        raise RunnerUnavailable("the int8 runners run on the CPU only")
    if dtype != torch.float32:
        raise RunnerUnavailable("int8 runners run in the fp32 row only (fp32 in, fp32 out, int8 inside)")


def ort_int8_factory(source="ours"):
    """ONNX Runtime static int8 quantization of the fp32 export (``ort-ours-int8``): ``quant_pre_process`` (shape
    inference and graph optimization), then ``quantize_static`` in QDQ format with per-channel int8 weights and uint8
    activations (MinMax), the settings ONNX Runtime recommends for x86 CPUs, ``reduce_range`` only on a CPU without
    VNNI. Calibrated on the row's first call, with that call's pixel values (the quantization counts in the row's
    "1st call s"); later calls and batch sizes reuse the quantized session."""

    def factory(variant, num_labels, device, dtype):
        try:
            import onnxruntime
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
            from onnxruntime.quantization.shape_inference import quant_pre_process
        except ImportError as err:
            raise RunnerUnavailable(f"onnxruntime.quantization is not importable ({err})") from None
        _int8_checks(device, dtype)
        fp32_path = _export(variant, num_labels, torch.float32, source)
        # VNNI multiplies u8 x s8 without the 16-bit saturation of older x86 (AVX2 / AVX-512 without VNNI)
        reduce_range = not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_isa())

        class OneBatch(CalibrationDataReader):
            """The calibration data: the first call's pixel values, once."""

            def __init__(self, pixel_values):
                self.batches = [{"pixel_values": pixel_values.detach().cpu().float().numpy()}]

            def get_next(self):
                return self.batches.pop() if self.batches else None

        state = {}  # "session": the quantized model's session, made on the first call

        def quantize(pixel_values):
            prepared = fp32_path.with_name(f"{fp32_path.stem}-prepared.onnx")
            quantized = fp32_path.with_name(f"{fp32_path.stem}-int8-qdq.onnx")
            quant_pre_process(str(fp32_path), str(prepared))
            with _without_root_log(_PER_TENSOR_FALLBACK):
                quantize_static(str(prepared), str(quantized), OneBatch(pixel_values), quant_format=QuantFormat.QDQ,
                                per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8)
            return _ort_session(quantized, ["CPUExecutionProvider"])

        def run(pixel_values):
            if "session" not in state:
                state["session"] = quantize(pixel_values)
            return run_onnx(state["session"], pixel_values)

        run.precision = "int8 (static QDQ, ORT)"
        run.notes = (f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider on {source} ONNX export quantized "
                     "by quant_pre_process + quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax "
                     f"calibration on the row's first batch, reduce_range={reduce_range}; "
                     "session.force_spinning_stop=1")
        return run

    return factory


def openvino_int8_factory(source="ours"):
    """OpenVINO with NNCF post-training int8 quantization (``openvino-ours-int8``): ``nncf.quantize`` of the
    OpenVINO model read from the fp32 export, ``model_type=nncf.ModelType.TRANSFORMER`` (its SmoothQuant and the
    transformer ignored patterns; the default model type if that fails, and the notes say so), compiled with
    ``INFERENCE_PRECISION_HINT=f32`` so the layers NNCF leaves in float run fp32. Calibrated on the first call's
    pixel values (in the row's "1st call s"); later batch sizes reuse the quantized model. The quantized model
    keeps the calibration's height and width (nncf 3.4 / openvino 2026.4: a dequantization constant takes the
    calibration grid's shape), so a new height x width is quantized again on its first call."""

    def factory(variant, num_labels, device, dtype):
        try:
            import nncf
            import openvino
        except ImportError as err:
            raise RunnerUnavailable(f"openvino or nncf is not importable ({err})") from None
        _int8_checks(device, dtype)
        core = openvino.Core()
        fp32_model = core.read_model(str(_export(variant, num_labels, torch.float32, source)))
        compiled_by_size = {}  # (H, W) -> the compiled quantized model

        def quantize(pixel_values):
            dataset = nncf.Dataset([pixel_values.detach().cpu().float().numpy()])
            # NNCF draws a progress bar per pass (rich, on stdout) and logs INFO lines: each takes a second or two
            # of the row's first call, which the row reports; the run's own lines are the rows
            nncf.set_log_level(logging.WARNING)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    quantized = nncf.quantize(fp32_model, dataset, subset_size=1,
                                              model_type=nncf.ModelType.TRANSFORMER)
                model_type = "model_type=TRANSFORMER"
            except Exception as err:  # noqa: BLE001 - the default model type is the fallback; the notes keep why
                with contextlib.redirect_stdout(io.StringIO()):
                    quantized = nncf.quantize(fp32_model, dataset, subset_size=1)
                model_type = f"default model type (model_type=TRANSFORMER failed: {one_line(err)})"
            run.notes = (f"openvino {openvino.__version__} CPU, INFERENCE_PRECISION_HINT=f32, on {source} ONNX export "
                         f"quantized by nncf {nncf.__version__} quantize ({model_type}), calibrated on the row's "
                         "first batch")
            return core.compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

        def run(pixel_values):
            size = tuple(pixel_values.shape[-2:])
            if size not in compiled_by_size:
                compiled_by_size[size] = quantize(pixel_values)
            return torch.from_numpy(compiled_by_size[size](pixel_values.float().numpy())[0])

        run.precision = "int8 (NNCF PTQ)"
        run.notes = f"openvino {openvino.__version__} CPU with nncf {nncf.__version__} PTQ (not quantized yet)"
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
