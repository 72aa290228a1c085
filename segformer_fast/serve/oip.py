"""The Open Inference Protocol (KServe / Triton "v2" REST), without Ray or an HTTP framework: server and model
metadata, and ``infer`` requests and responses in JSON and with the binary-data extension.

The model ``segformer-fast`` (version ``1``) takes one image per request, as exactly one of two inputs:

- ``image_bytes``: ``BYTES``, shape ``[1]``: the encoded image (PNG, JPEG, ...): with the binary-data extension
  the element as the protocol frames it (a 4-byte little-endian length, then the bytes), in JSON its base64 text;
- ``image``: ``UINT8``, shape ``[H, W, 3]``: RGB pixels, row-major.

and answers with any of ``labels`` (``UINT8`` ``[H, W]``, ``INT32`` above 256 classes: the class of every pixel at
the image's size, equal to ``engine.segment``), ``class_shares`` (``FP32`` ``[K]``: each class's share of the
pixels) and ``logits`` (``FP32`` ``[K, h, w]``, a quarter of the size the image runs at; whole mode only, and only
when asked for). Without ``outputs`` the answer holds ``labels`` and ``class_shares``. Request ``parameters`` take
``segment``'s resize options as ``/v1/segment`` does (``mode``, ``size``, ``short_side``, ``max_long_side``,
``timeout_s``) and ``binary_data_output``. Every refusal is an ``ApiError`` with a message, which the routes answer
in the protocol's error form, ``{"error": "..."}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct

import numpy as np

from segformer_fast.serve.api import PARAMETERS, ApiError, SegmentRequest, ServeSettings, parse_query

MODEL_NAME = "segformer-fast"
MODEL_VERSION = "1"
#: The request header that gives the length of the JSON part of a body with binary tensors after it.
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]
INPUTS = {"image_bytes": ("BYTES", [1]), "image": ("UINT8", [-1, -1, 3])}
DEFAULT_OUTPUTS = ("labels", "class_shares")
#: ``datatype`` -> numpy dtype of the tensors this model returns.
DTYPES = {"UINT8": np.uint8, "INT32": np.int32, "FP32": np.float32}


def server_metadata(version: str) -> dict:
    return {"name": MODEL_NAME, "version": version, "extensions": EXTENSIONS}


def labels_datatype(num_labels: int) -> str:
    return "UINT8" if num_labels <= 256 else "INT32"


def model_metadata(description: dict) -> dict:
    """The model's name, versions, platform, inputs and outputs (-1: any size)."""
    classes = description["num_labels"]
    return {
        "name": MODEL_NAME, "versions": [MODEL_VERSION], "platform": "segformer-fast",
        "inputs": [{"name": name, "datatype": datatype, "shape": shape} for name, (datatype, shape) in INPUTS.items()],
        "outputs": [{"name": "labels", "datatype": labels_datatype(classes), "shape": [-1, -1]},
                    {"name": "class_shares", "datatype": "FP32", "shape": [classes]},
                    {"name": "logits", "datatype": "FP32", "shape": [classes, -1, -1]}],
        "parameters": {"variant": description["variant"], "dtype": description["dtype"],
                       "device": description["device"], "classes": [entry["name"] for entry in description["classes"]]},
    }


def check_model(name: str, version: str | None = None) -> None:
    if name != MODEL_NAME:
        raise ApiError(404, f"unknown model {name!r}; this server serves {MODEL_NAME!r}")
    if version is not None and version != MODEL_VERSION:
        raise ApiError(404, f"unknown version {version!r} of model {name!r}; it has version {MODEL_VERSION!r}")


class InferRequest:
    """A checked ``infer`` request: the image (``data`` encoded or ``pixels``), the segment request, the outputs
    asked for ({name: binary?}) and the request's id."""

    def __init__(self, data: bytes | None, pixels: np.ndarray | None, segment: SegmentRequest, outputs: dict,
                 request_id: str | None):
        self.data, self.pixels, self.segment, self.outputs, self.id = data, pixels, segment, outputs, request_id


def parse_infer(body: bytes, header_length: str | None, settings: ServeSettings) -> InferRequest:
    """An ``infer`` body (JSON, or JSON of ``header_length`` bytes followed by binary tensors) -> InferRequest.
    ApiError 400 naming what is wrong (JSON, input name, datatype, shape, data size, parameter, output), 413 for
    pixels over ``--max-pixels``."""
    header, binary = _split(body, header_length)
    if not isinstance(header, dict):
        raise ApiError(400, "the infer request must be a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, f"give exactly one input, {' or '.join(_describe_inputs())}; got "
                            f"{len(inputs) if isinstance(inputs, list) else type(inputs).__name__}")
    data, pixels = _read_input(inputs[0], binary, settings)
    parameters = header.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ApiError(400, "parameters must be a JSON object")
    binary_default = parameters.get("binary_data_output", False)
    known = [name for name in PARAMETERS if name != "output"] + ["binary_data_output"]
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}; known: {', '.join(known)}")
    segment = parse_query([(name, _text(value)) for name, value in parameters.items()
                           if name != "binary_data_output"], settings)
    if not isinstance(binary_default, bool):
        raise ApiError(400, f"binary_data_output must be true or false, got {binary_default!r}")
    outputs = _read_outputs(header.get("outputs", DEFAULT_OUTPUTS), binary_default)
    if "logits" in outputs and segment.mode != "whole":
        raise ApiError(400, f"the logits output needs mode whole, got mode {segment.mode!r}")
    request_id = header.get("id")
    if "id" in header and not isinstance(request_id, str):
        raise ApiError(400, f"id must be a string, got {request_id!r}")
    return InferRequest(data, pixels, segment, outputs, request_id)


def _split(body: bytes, header_length: str | None) -> tuple:
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise ApiError(400, f"Inference-Header-Content-Length {header_length!r} is not a length within the "
                                f"body's {len(body)} bytes")
        json_part, binary = body[:length], body[length:]
    try:
        return json.loads(json_part), binary
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the infer request is not valid JSON: {error}") from None


def _describe_inputs() -> list:
    return [f"{name} ({datatype} {shape})".replace("-1", "H", 1).replace("-1", "W", 1)
            for name, (datatype, shape) in INPUTS.items()]


def _read_input(tensor: dict, binary: bytes, settings: ServeSettings) -> tuple:
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or name not in INPUTS:
        raise ApiError(400, f"unknown input {name!r}; this model takes {' or '.join(_describe_inputs())}")
    expected = INPUTS[name][0]
    if datatype != expected:
        raise ApiError(400, f"input {name!r} must have datatype {expected}, got {datatype!r}")
    if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                            for n in shape)):
        raise ApiError(400, f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    parameters = tensor.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ApiError(400, f"input {name!r}: parameters must be a JSON object, got {parameters!r}")
    size = parameters.get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ApiError(400, f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
    if size is not None and size != len(binary):
        raise ApiError(400, f"input {name!r}: binary_data_size {size} but {len(binary)} bytes follow the JSON")
    if size is None and binary:
        raise ApiError(400, f"{len(binary)} bytes follow the JSON but no input has binary_data_size")
    if name == "image_bytes":
        if shape != [1]:
            raise ApiError(400, f"input 'image_bytes' must have shape [1] (one encoded image), got {shape}")
        return (_bytes_element(binary) if size is not None else _json_bytes(tensor.get("data"))), None
    if len(shape) != 3 or shape[2] != 3 or shape[0] < 1 or shape[1] < 1:
        raise ApiError(400, f"input 'image' must have shape [H, W, 3] (RGB pixels), got {shape}")
    if shape[0] * shape[1] > settings.max_pixels:
        raise ApiError(413, f"image of {shape[1]}x{shape[0]} = {shape[0] * shape[1]} pixels, over the limit of "
                            f"{settings.max_pixels} (--max-pixels)")
    count = shape[0] * shape[1] * 3
    if size is not None:
        if size != count:
            raise ApiError(400, f"input 'image': shape {shape} holds {count} bytes, binary_data_size is {size}")
        return None, np.frombuffer(binary, dtype=np.uint8).reshape(shape).copy()
    try:
        values = np.asarray(tensor.get("data"))
    except ValueError:  # ragged nested lists
        values = np.asarray([])
    if values.dtype.kind not in "iu" or values.size != count:
        raise ApiError(400, f"input 'image': shape {shape} needs {count} integers in data, got {values.size} "
                            f"{values.dtype.name} values")
    if values.min() < 0 or values.max() > 255:
        raise ApiError(400, "input 'image': data must be integers in 0..255")
    return None, values.astype(np.uint8).reshape(shape)


def _bytes_element(binary: bytes) -> bytes:
    """The one element of a binary BYTES tensor: a 4-byte little-endian length, then that many bytes."""
    if len(binary) < 4:
        raise ApiError(400, "input 'image_bytes': the binary data is shorter than its 4-byte length prefix")
    (length,) = struct.unpack_from("<I", binary)
    if length != len(binary) - 4:
        raise ApiError(400, f"input 'image_bytes': the element says {length} bytes, {len(binary) - 4} follow "
                            "(shape [1]: exactly one element)")
    return binary[4:]


def _json_bytes(data) -> bytes:
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
        data = data[0]
    if not (isinstance(data, list) and len(data) == 1 and isinstance(data[0], str)):
        raise ApiError(400, "input 'image_bytes' in JSON: data must be one string, the image in base64")
    try:
        return base64.b64decode(data[0], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "input 'image_bytes' in JSON: data must be the image in base64") from None


def _read_outputs(outputs, binary_default: bool) -> dict:
    if outputs is DEFAULT_OUTPUTS:  # none asked for
        return {name: binary_default for name in DEFAULT_OUTPUTS}
    if not isinstance(outputs, list) or not outputs:
        raise ApiError(400, "outputs must be a non-empty list of {\"name\": ...}")
    chosen = {}
    for entry in outputs:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name not in ("labels", "class_shares", "logits"):
            raise ApiError(400, f"unknown output {name!r}; this model has labels, class_shares, logits")
        parameters = entry.get("parameters", {})
        if not isinstance(parameters, dict) or not isinstance(parameters.get("binary_data", False), bool):
            raise ApiError(400, f"output {name!r}: parameters must be an object, binary_data true or false")
        if "classification" in parameters:
            raise ApiError(400, "the classification extension is not supported")
        chosen[name] = parameters.get("binary_data", binary_default)
    return chosen


def _text(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ApiError(400, f"parameter values must be strings or numbers, got {value!r}")
    return str(value)


def infer_response(request: InferRequest, labels: np.ndarray, logits: np.ndarray | None, num_labels: int) -> tuple:
    """(body, headers) of the answer: JSON, or JSON followed by the binary outputs (with the length header)."""
    tensors = {}
    if "labels" in request.outputs:
        datatype = labels_datatype(num_labels)
        tensors["labels"] = (datatype, labels.astype(DTYPES[datatype], copy=False))
    if "class_shares" in request.outputs:
        counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=num_labels)
        tensors["class_shares"] = ("FP32", (counts / max(1, labels.size)).astype(np.float32))
    if "logits" in request.outputs:
        tensors["logits"] = ("FP32", logits.astype(np.float32, copy=False))
    outputs, chunks = [], []
    for name, (datatype, array) in tensors.items():
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if request.outputs[name]:
            chunk = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    document = {"model_name": MODEL_NAME, "model_version": MODEL_VERSION, "outputs": outputs}
    if request.id is not None:
        document["id"] = request.id
    header = json.dumps(document).encode("utf-8")
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {"Content-Type": "application/octet-stream",
                                       "Inference-Header-Content-Length": str(len(header))}
