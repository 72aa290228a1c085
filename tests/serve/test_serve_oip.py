"""The Open Inference Protocol (v2 REST) of ``segformer-fast serve``: the protocol's request and response handling
on its own (``serve.oip``), then a real local server driven by the real ``tritonclient[http]`` client: readiness,
server and model metadata, ``infer`` with the image as encoded bytes and as a UINT8 tensor, in JSON and with the
binary-data extension, labels equal to ``engine.segment``, logits equal to the engine's, bad tensors refused with
400 in the protocol's error form. (KServe's own Python client does not install beside this project's pins: it
requires starlette 0.49 / numpy < 2 / python-dateutil < 3, so tritonclient is the client here.)
"""

import io
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from segformer_fast import Segformer, optimize
from segformer_fast.inference.processing import preprocess
from segformer_fast.serve import oip
from segformer_fast.serve.api import ApiError, ServeSettings

from bench_common.local_server import LocalServer

SETTINGS = ServeSettings(model="x", max_pixels=100_000)
MODEL = oip.MODEL_NAME


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ serve.oip, no server
def binary_body(header: dict, binary: bytes) -> tuple:
    text = json.dumps(header).encode()
    return text + binary, str(len(text))


def test_parse_infer_json_and_binary_forms():
    image = random_image(5, 7, 0)
    tensor = {"name": "image", "datatype": "UINT8", "shape": [5, 7, 3]}
    parsed = oip.parse_infer(json.dumps({"id": "a", "inputs": [{**tensor,
                                         "data": image.reshape(-1).tolist()}],
                                         "parameters": {"size": "64", "timeout_s": 3}}).encode(), None, SETTINGS)
    np.testing.assert_array_equal(parsed.pixels, image)
    assert parsed.id == "a" and parsed.segment.target_size(5, 7) == (64, 64) and parsed.segment.timeout_s == 3
    assert parsed.outputs == {"labels": False, "class_shares": False}
    data = png(image)
    body, length = binary_body({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                            "parameters": {"binary_data_size": len(data) + 4}}],
                                "outputs": [{"name": "labels", "parameters": {"binary_data": True}}]},
                               struct.pack("<I", len(data)) + data)
    parsed = oip.parse_infer(body, length, SETTINGS)
    assert parsed.data == data and parsed.outputs == {"labels": True}


@pytest.mark.parametrize("tensor, fragment", [
    ({"name": "picture", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}, "unknown input 'picture'"),
    ({"name": "image", "datatype": "FP32", "shape": [1, 1, 3], "data": [0, 0, 0]}, "datatype UINT8"),
    ({"name": "image", "datatype": "UINT8", "shape": [1, 3], "data": [0, 0, 0]}, "shape [H, W, 3]"),
    ({"name": "image", "datatype": "UINT8", "shape": [1, 1, 3], "data": [0, 0]}, "needs 3 integers"),
    ({"name": "image", "datatype": "UINT8", "shape": [1, 1, 3], "data": [0, 0, 256]}, "0..255"),
    ({"name": "image", "datatype": "UINT8", "shape": [1, 1, 3], "data": [0.5, 0, 1]}, "integers"),
    ({"name": "image_bytes", "datatype": "BYTES", "shape": [2], "data": ["eA==", "eA=="]}, "shape [1]"),
    ({"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}, "base64"),
    ({"name": "image", "datatype": "UINT8", "shape": [400, 400, 3], "data": []}, "--max-pixels"),
])
def test_parse_infer_refuses_bad_tensors(tensor, fragment):
    with pytest.raises(ApiError) as caught:
        oip.parse_infer(json.dumps({"inputs": [tensor]}).encode(), None, SETTINGS)
    assert caught.value.status == (413 if "pixels" in fragment else 400)
    assert fragment in caught.value.message, caught.value.message


def test_parse_infer_refuses_bad_requests():
    good = {"name": "image", "datatype": "UINT8", "shape": [1, 1, 3], "data": [1, 2, 3]}
    cases = [(b"{", None, "not valid JSON"), (b"[]", None, "JSON object"),
             (json.dumps({"inputs": []}).encode(), None, "exactly one input"),
             (json.dumps({"inputs": [good], "parameters": {"colour": "red"}}).encode(), None, "unknown parameter"),
             (json.dumps({"inputs": [good], "outputs": [{"name": "mask"}]}).encode(), None, "unknown output"),
             (json.dumps({"inputs": [good], "outputs": [{"name": "logits"}], "parameters": {"mode": "slide"}}).encode(),
              None, "mode whole"),
             (json.dumps({"inputs": [good]}).encode(), "999", "Inference-Header-Content-Length"),
             (json.dumps({"inputs": [{**good, "parameters": {"binary_data_size": 3}}]}).encode(), None,
              "binary_data_size 3 but 0 bytes")]
    for body, length, fragment in cases:
        with pytest.raises(ApiError) as caught:
            oip.parse_infer(body, length, SETTINGS)
        assert caught.value.status == 400 and fragment in caught.value.message, (body[:60], caught.value.message)


def test_infer_response_json_and_binary():
    labels = np.array([[0, 2], [2, 2]], dtype=np.uint8)
    request = oip.InferRequest(None, None, None, {"labels": True, "class_shares": False}, "r1")
    body, headers = oip.infer_response(request, labels, None, num_labels=3)
    length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:length])
    assert header["id"] == "r1" and header["model_name"] == MODEL
    labels_entry, shares_entry = header["outputs"]
    assert labels_entry == {"name": "labels", "datatype": "UINT8", "shape": [2, 2],
                            "parameters": {"binary_data_size": 4}}
    assert body[length:] == labels.tobytes()
    assert shares_entry["data"] == pytest.approx([0.25, 0.0, 0.75])
    wide = oip.infer_response(oip.InferRequest(None, None, None, {"labels": False}, None),
                              labels.astype(np.uint16) + 300, None, num_labels=400)
    assert json.loads(wide[0])["outputs"][0]["datatype"] == "INT32"
    assert json.loads(wide[0])["outputs"][0]["data"] == [300, 302, 302, 302]


# --------------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-oip") / "b0"
    Segformer.from_config("b0", num_labels=19, seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engine(checkpoint):
    return optimize(Segformer.from_pretrained(checkpoint))


@pytest.fixture(scope="module")
def client(checkpoint):
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "ray[serve]")')
    http = pytest.importorskip("tritonclient.http", reason='tritonclient is not installed (pip install '
                               '"tritonclient[http]")')
    local = LocalServer(checkpoint, ["--max-batch-size", "4", "--batch-wait-ms", "50", "--max-pixels", "200000"])
    local.start()
    triton = http.InferenceServerClient(f"{local.host}:{local.port}", network_timeout=120.0,
                                        connection_timeout=120.0)
    yield triton, local
    triton.close()
    left = local.stop()
    local.cleanup()
    assert not left, f"processes left running after the server stopped: {left}"


def test_readiness_and_metadata(client):
    triton, _ = client
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    assert not triton.is_model_ready("another-model")
    server = triton.get_server_metadata()
    assert server["name"] == MODEL and "binary_tensor_data" in server["extensions"]
    metadata = triton.get_model_metadata(MODEL)
    assert metadata["versions"] == ["1"]
    assert {(t["name"], t["datatype"]) for t in metadata["inputs"]} == {("image_bytes", "BYTES"), ("image", "UINT8")}
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in metadata["outputs"]} == {
        ("labels", "UINT8", (-1, -1)), ("class_shares", "FP32", (19,)), ("logits", "FP32", (19, -1, -1))}
    assert triton.get_model_metadata(MODEL, model_version="1") == metadata


def test_infer_both_input_forms_equal_engine_segment(client, engine):
    from tritonclient.http import InferInput, InferRequestedOutput

    image = random_image(70, 90, 7)
    expected = engine.segment(Image.fromarray(image), size=(64, 96)).numpy()
    counts = np.bincount(expected.reshape(-1), minlength=19) / expected.size
    triton, _ = client
    encoded = InferInput("image_bytes", [1], "BYTES")
    encoded.set_data_from_numpy(np.array([png(image)], dtype=np.object_))
    for binary in (True, False):
        pixels = InferInput("image", list(image.shape), "UINT8")
        pixels.set_data_from_numpy(image, binary_data=binary)
        for tensor in (encoded, pixels):
            result = triton.infer(MODEL, [tensor], parameters={"size": "64x96"}, request_id="req-7", outputs=[
                InferRequestedOutput("labels", binary_data=binary), InferRequestedOutput("class_shares",
                                                                                         binary_data=binary)])
            assert result.get_response()["id"] == "req-7"
            labels = result.as_numpy("labels")
            assert labels.dtype == np.uint8 and labels.shape == (70, 90)
            np.testing.assert_array_equal(labels, expected)
            np.testing.assert_allclose(result.as_numpy("class_shares"), counts, rtol=1e-6)


def test_infer_logits_equal_the_engines(client, engine):
    from tritonclient.http import InferInput, InferRequestedOutput

    image = random_image(40, 56, 8)
    triton, _ = client
    tensor = InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    result = triton.infer(MODEL, [tensor], parameters={"size": "64"}, outputs=[InferRequestedOutput("logits"),
                                                                                  InferRequestedOutput("labels")])
    with torch.no_grad():
        expected = engine.logits(preprocess(Image.fromarray(image), size=(64, 64)))[0].numpy()
    logits = result.as_numpy("logits")
    assert logits.shape == (19, 16, 16)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    np.testing.assert_array_equal(result.as_numpy("labels"), engine.segment(Image.fromarray(image), size=64).numpy())


@pytest.mark.parametrize("name, shape, datatype, fragment", [
    ("image", [10, 12, 3], "FP32", "datatype UINT8"),
    ("image", [10, 12], "UINT8", "shape [H, W, 3]"),
    ("photo", [10, 12, 3], "UINT8", "unknown input 'photo'"),
    ("image_bytes", [2], "BYTES", "shape [1]"),
])
def test_infer_bad_tensors_400(client, name, shape, datatype, fragment):
    from tritonclient.http import InferInput
    from tritonclient.utils import InferenceServerException

    triton, local = client
    tensor = InferInput(name, shape, datatype)
    if datatype == "BYTES":
        tensor.set_data_from_numpy(np.array([b"a"] * shape[0], dtype=np.object_))
    else:
        tensor.set_data_from_numpy(np.zeros(shape, dtype=np.float32 if datatype == "FP32" else np.uint8))
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(MODEL, [tensor])
    assert caught.value.status() == "400" and fragment in caught.value.message(), caught.value
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("other-model", [tensor])
    assert caught.value.status() == "404" and "unknown model" in caught.value.message()
    status, headers, body = local.call("POST", f"/v2/models/{MODEL}/infer", b"{not json",
                                       {"Content-Type": "application/json"})
    assert status == 400 and headers["content-type"] == "application/json" and set(json.loads(body)) == {"error"}
