"""``segformer-fast serve`` against a real local server: a ``segformer-fast serve`` process on a free loopback port
with its own Ray (a session folder under /tmp), a random checkpoint saved in tmp, no mock of Ray or of HTTP.

One server for the whole module (two model replicas, small limits so every refusal is cheap to provoke); the
module's last test stops it with SIGINT and checks that no process it started is left. The request logic without
a server is in test_serve_api.py.
"""

import io
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from segformer_fast import Segformer, optimize
from segformer_fast.render.palettes import ADE20K_CLASSES, overlay, palette_for
from segformer_fast.serve import api

from bench_common.local_server import LocalServer, alive, http_call
from serve_support import multipart, png_bytes, random_png

MAX_PIXELS = 1_000_000
SERVER_ARGS = ["--class-names", "ade20k", "--replicas", "2", "--cpus-per-replica", "1", "--max-batch-size", "4",
               "--batch-wait-ms", "150", "--max-body-mb", "1", "--max-pixels", str(MAX_PIXELS), "--max-queue", "8",
               "--request-timeout-s", "90"]
#: every call of a test is bounded: no request may take longer than this (a hang fails the test)
CALL_TIMEOUT_S = 120


SETTINGS = api.ServeSettings(model="x", max_body_mb=1, max_pixels=MAX_PIXELS)


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-ckpt") / "b0"
    Segformer.from_config("b0", num_labels=150, seed=11).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engine(checkpoint):
    return optimize(Segformer.from_pretrained(checkpoint))


@pytest.fixture(scope="module")
def server(checkpoint):
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "ray[serve]")')
    local = LocalServer(checkpoint, SERVER_ARGS)
    local.start()
    yield local
    left = local.stop()
    local.cleanup()
    assert not left, f"processes left running after the server stopped: {left}"


def post(server, path: str, data: bytes, headers: dict | None = None, timeout_s: float = CALL_TIMEOUT_S):
    return server.call("POST", path, data, {"Content-Type": "application/octet-stream", **(headers or {})},
                       timeout_s=timeout_s)


def assert_json_error(status: int, headers: dict, body: bytes, expected_status: int, fragment: str = "") -> dict:
    assert status == expected_status, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert b"Traceback" not in body and b'File "' not in body, body
    payload = json.loads(body)
    assert set(payload) == {"error"} and fragment in payload["error"], payload
    return payload


def assert_still_serving(server) -> None:
    status, headers, body = post(server, "/v1/segment?output=json&size=32", random_png(20, 30, 99))
    assert status == 200, body[:300]
    assert json.loads(body)["height"] == 20


def test_ready_and_describes_itself(server, checkpoint):
    assert server.url in server.ready_line and str(checkpoint) in server.ready_line
    assert "MiT-B0" in server.ready_line and "2 replicas" in server.ready_line
    for path in ("/healthz", "/readyz"):
        status, _, body = server.call("GET", path)
        assert status == 200, body
    status, _, body = server.call("GET", "/v1/model")
    model = json.loads(body)
    assert status == 200
    assert (model["variant"], model["num_labels"], model["dtype"], model["device"]) == ("b0", 150, "fp32", "cpu")
    assert [entry["name"] for entry in model["classes"]] == list(ADE20K_CLASSES)
    assert model["version"] and model["service"]["max_batch_size"] == 4
    assert model["verification"]["max_abs_error"] <= model["verification"]["tolerance"]


def test_openapi_and_page(server):
    status, _, body = server.call("GET", "/openapi.json")
    spec = json.loads(body)
    assert status == 200 and {"/v1/segment", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])
    segment = spec["paths"]["/v1/segment"]["post"]
    assert {p["name"] for p in segment["parameters"]} == set(api.PARAMETERS)
    assert {"application/octet-stream", "multipart/form-data"} <= set(segment["requestBody"]["content"])
    assert {"200", "400", "413", "503", "504"} <= set(segment["responses"])
    status, headers, body = server.call("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'type="file"' in body and b"/v1/segment" in body


def test_concurrent_mixed_sizes_equal_engine_segment(server, engine):
    """Eight requests at once, images of five sizes run at three preprocessed sizes: every label map equals
    engine.segment on the same image, and each forward held only requests of one preprocessed size."""
    cases = [((70, 90), "size=64"), ((41, 37), "size=64"), ((64, 64), "size=64"), ((50, 120), "size=48x96"),
             ((50, 120), "size=48x96"), ((100, 80), "short_side=40"), ((70, 90), "size=48x96"),
             ((33, 47), "size=64")]
    images = [random_png(h, w, seed) for seed, ((h, w), _) in enumerate(cases)]
    outputs = ["labels", "json", "overlay", "labels", "labels", "json", "overlay", "labels"]

    def send(index):
        return post(server, f"/v1/segment?output={outputs[index]}&{cases[index][1]}", images[index])

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(send, range(len(cases))))
    per_size: dict = {}
    for (_, query), image in zip(cases, images):
        size = api.parse_query([tuple(query.split("="))], SETTINGS).target_size(*decoded(image).size[::-1])
        per_size[size] = per_size.get(size, 0) + 1
    palette = palette_for(150)
    batches = []
    for index, ((status, headers, body), (_, query)) in enumerate(zip(answers, cases)):
        assert status == 200, body[:300]
        image = decoded(images[index]).convert("RGB")
        key, value = query.split("=")
        resize = {"short_side": int(value)} if key == "short_side" else {
            "size": tuple(int(v) for v in value.split("x")) if "x" in value else (int(value), int(value))}
        expected = engine.segment(image, **resize).numpy()
        size = api.parse_query([(key, value)], SETTINGS).target_size(image.height, image.width)
        batch = int(headers["x-batch-size"])
        assert 1 <= batch <= per_size[size], (query, batch, per_size)
        batches.append(batch)
        if outputs[index] == "labels":
            got = decoded(body)
            assert got.mode == "P" and got.getpalette()[:6] == palette[:2].reshape(-1).tolist()
            np.testing.assert_array_equal(np.asarray(got), expected, err_msg=query)
        elif outputs[index] == "overlay":
            np.testing.assert_array_equal(np.asarray(decoded(body).convert("RGB")),
                                          np.asarray(overlay(image, expected, palette)), err_msg=query)
        else:
            counts = np.bincount(expected.reshape(-1), minlength=150)
            result = json.loads(body)
            assert {c["id"]: c["pixels"] for c in result["classes"]} == {
                int(i): int(counts[i]) for i in np.flatnonzero(counts)}
            assert sum(c["share"] for c in result["classes"]) == pytest.approx(1.0)
    assert max(batches) > 1, f"no two same-size requests shared a forward: {batches}"


def test_multipart_and_modes_equal_engine_segment(server, engine):
    data = random_png(45, 60, 21)
    image = decoded(data).convert("RGB")
    body, content_type = multipart(data)
    status, _, got = post(server, "/v1/segment?size=32x48", body, {"Content-Type": content_type})
    assert status == 200, got[:300]
    np.testing.assert_array_equal(np.asarray(decoded(got)), engine.segment(image, size=(32, 48)).numpy())
    for mode in ("slide", "auto"):
        status, _, got = post(server, f"/v1/segment?mode={mode}", data)
        assert status == 200, got[:300]
        np.testing.assert_array_equal(np.asarray(decoded(got)), engine.segment(image, size=None, mode=mode).numpy())


def bad_requests():
    """(name, method, path, body, headers, status, fragment of the message)."""
    good = random_png(20, 20, 5)
    return [
        ("body over the limit", "POST", "/v1/segment", b"\0" * (2**20 + 10), {}, 413, "over the limit"),
        ("chunked body over the limit", "POST", "/v1/segment", iter([b"\0" * 2**19] * 3), {}, 413,
         "over the limit"),
        ("not an image", "POST", "/v1/segment", b"this is not an image" * 10, {}, 400, "not an image"),
        ("empty body", "POST", "/v1/segment", b"", {}, 400, "empty"),
        ("truncated image", "POST", "/v1/segment", random_png(64, 64, 3)[:200], {}, 400, "truncated"),
        ("pixel bomb", "POST", "/v1/segment", png_bytes(np.zeros((4000, 4000), dtype=np.uint8)), {}, 413,
         "--max-pixels"),
        ("resize over the pixel limit", "POST", "/v1/segment?size=2000", good, {}, 413, "--max-pixels"),
        ("unknown parameter", "POST", "/v1/segment?colour=red", good, {}, 400, "unknown parameter"),
        ("unknown output", "POST", "/v1/segment?output=mask", good, {}, 400, "unknown output"),
        ("malformed size", "POST", "/v1/segment?size=big", good, {}, 400, "size"),
        ("multipart without a file", "POST", "/v1/segment", b"--b\r\nContent-Disposition: form-data; "
         b"name=\"x\"\r\n\r\n1\r\n--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}, 400, "file part"),
        ("unknown path", "GET", "/v1/nothing", None, {}, 404, ""),
        ("wrong method", "GET", "/v1/segment", None, {}, 405, ""),
    ]


@pytest.mark.parametrize("case", bad_requests(), ids=lambda case: case[0])
def test_bad_input_answers_json_and_serving_goes_on(server, case):
    _, method, path, body, headers, expected, fragment = case
    headers = {"Content-Type": "application/octet-stream", **headers}
    status, answer_headers, answer = server.call(method, path, body, headers, timeout_s=CALL_TIMEOUT_S)
    assert_json_error(status, answer_headers, answer, expected, fragment)
    assert_still_serving(server)


def test_past_the_timeout_504(server):
    start = time.monotonic()
    status, headers, body = post(server, "/v1/segment?size=768&timeout_s=0.01", random_png(40, 40, 8))
    assert_json_error(status, headers, body, 504, "no result within 0.01 s")
    assert time.monotonic() - start < 30
    assert_still_serving(server)


def test_overload_503_with_retry_after(server):
    """Twice --max-queue requests at once: the ones over the queue get 503 with Retry-After, the rest succeed."""
    data = random_png(60, 60, 9)
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: post(server, "/v1/segment?size=320", data), range(24)))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 8, statuses
    for status, headers, body in answers:
        if status == 503:
            assert_json_error(status, headers, body, 503, "--max-queue")
            assert int(headers["retry-after"]) >= 1
    assert_still_serving(server)


def cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_replica_killed_under_load_is_restarted(server):
    """SIGKILL one of the two model replicas in the middle of a forward: the requests it held fail with 503 (with
    Retry-After), every request ends within its bound, the others succeed, and Ray starts a new replica."""
    replicas = server.find("SegmentModel")
    assert len(replicas) == 2, server.track()
    victim = replicas[0]
    data = random_png(60, 60, 10)
    with ThreadPoolExecutor(8) as pool:
        before = cpu_ticks(victim)
        futures = [pool.submit(post, server, "/v1/segment?size=384", data, None, 90) for _ in range(8)]
        deadline = time.monotonic() + 20
        while cpu_ticks(victim) < before + 5 and time.monotonic() < deadline:  # the victim is running a forward
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        answers = [future.result(timeout=CALL_TIMEOUT_S) for future in futures]
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}, [(s, b[:200]) for s, _, b in answers]
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
    for status, headers, body in answers:
        if status == 503:
            assert_json_error(status, headers, body, 503, "replica")
            assert "retry-after" in headers
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = server.find("SegmentModel")
        if len(current) == 2 and victim not in current:
            status, _, _ = server.call("GET", "/readyz")
            if status == 200:
                break
        time.sleep(1)
    else:
        pytest.fail(f"the killed replica was not replaced within 120 s: {server.find('SegmentModel')}")
    assert_still_serving(server)


def test_sigint_shuts_down_cleanly(server):
    """Ctrl-C: the server exits 0, its Ray instance is stopped, no process it started is left."""
    processes = server.track()
    assert any("raylet" in command for _, command in processes.values()), "Ray's processes were not found"
    left = server.stop(signal.SIGINT)
    assert not left, f"left running: {left}"
    assert server.process.returncode == 0, server.log_tail()
    assert not alive(processes)
    assert "stopped" in server.log_text()
    with pytest.raises(OSError):
        http_call(server.host, server.port, "GET", "/healthz", timeout_s=5)
