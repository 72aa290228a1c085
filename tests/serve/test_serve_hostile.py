"""``segformer-fast serve`` against hostile clients: one test per case of the battery the service failed before
(slow bodies, timed-out work left running, multipart floods, memory per request, huge headers, images the decoder
chokes on, a signal dropping requests in flight, a disclosed path, HEAD, a huge URL), on a real local server with
small limits, raw sockets where an HTTP client would refuse to misbehave. The module's last test stops the server
with SIGINT while a request is in flight.
"""

import asyncio
import io
import json
import os
import signal
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from segformer_fast import Segformer
from segformer_fast.serve import uploads
from segformer_fast.serve.admission import Admission
from segformer_fast.serve.api import ApiError

from bench_common.local_server import LocalServer, alive

MAX_PIXELS = 1_100_000
SERVER_ARGS = ["--max-queue", "4", "--max-batch-size", "1", "--request-timeout-s", "30", "--idle-timeout-s", "2",
               "--max-pixels", str(MAX_PIXELS), "--max-pixels-in-flight", str(2 * MAX_PIXELS), "--max-body-mb", "4"]
CALL_TIMEOUT_S = 120
#: Pillow deprecates writing IM files, which two tests do on purpose (a format the service must refuse)
IM_DEPRECATED = pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def random_png(height: int, width: int, seed: int) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def saved(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def tiff_with_srational_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag is typed SRATIONAL (Pillow raises TypeError decoding it)."""
    data = bytearray(saved(Image.fromarray(np.zeros((4, 4, 3), np.uint8)), "TIFF"))
    directory = struct.unpack_from("<I", data, 4)[0]
    for index in range(struct.unpack_from("<H", data, directory)[0]):
        entry = directory + 2 + 12 * index
        if struct.unpack_from("<H", data, entry)[0] == 273:
            struct.pack_into("<H", data, entry + 2, 10)
    return bytes(data)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none (Pillow's own bomb check fires on it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            chunk(b"IEND", b""))


def nested_multipart(depth: int) -> tuple:
    body = b"x"
    for level in range(depth):
        boundary = f"b{level}".encode()
        body = (b"--" + boundary + b"\r\nContent-Type: multipart/mixed; boundary=b" + str(level - 1).encode() +
                b"\r\n\r\n" + body + b"\r\n--" + boundary + b"--\r\n")
    return body, f"multipart/form-data; boundary=b{depth - 1}"


def many_fields(count: int) -> tuple:
    body = b"".join(b"--B\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nv\r\n" % i for i in range(count))
    return body + b"--B--\r\n", "multipart/form-data; boundary=B"


def timings(headers: dict) -> dict:
    """Server-Timing's stages in ms."""
    return {part.split(";")[0].strip(): float(part.split("dur=")[1]) for part in headers["server-timing"].split(",")}


def json_error(status: int, headers: dict, body: bytes, expected: int, fragment: str = "") -> None:
    assert status == expected, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    payload = json.loads(body)
    assert set(payload) == {"error"} and fragment in payload["error"], payload


def raw_exchange(port: int, chunks, pause_s: float = 0.0, read_timeout_s: float = 30.0) -> bytes:
    """Send ``chunks`` on a new connection (a thread, ``pause_s`` apart) while reading the answer until the server
    closes the connection; the bytes read (the server may reset the connection while we still send)."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=read_timeout_s)

    def send():
        try:
            for chunk in chunks:
                connection.sendall(chunk)
                time.sleep(pause_s)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = b""
    try:
        while True:
            data = connection.recv(65536)
            if not data:
                break
            received += data
    except OSError:
        pass
    connection.close()
    sender.join(timeout=read_timeout_s)
    return received


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


# ---------------------------------------------------------------------------------------- without a server
def test_admission_counts_pixels_first_come_first_served():
    async def scenario():
        admission = Admission(max_requests=8, max_pixels=100)
        first, second, third = admission.admit(), admission.admit(), admission.admit()
        await admission.reserve(first, 60)
        waiting = [asyncio.ensure_future(admission.reserve(second, 50)),
                   asyncio.ensure_future(admission.reserve(third, 10))]
        await asyncio.sleep(0.01)
        # 60 + 50 does not fit; 10 would, but waits behind 50: first come, first served
        assert [task.done() for task in waiting] == [False, False] and admission.pixels == 60
        admission.release(first)
        await asyncio.wait_for(asyncio.gather(*waiting), 1)
        assert admission.pixels == 60 and admission.requests == 2
        cancelled = admission.admit()
        pending = asyncio.ensure_future(admission.reserve(cancelled, 50))
        await asyncio.sleep(0.01)
        pending.cancel()  # its deadline passed while waiting: it leaves the queue holding nothing
        await asyncio.gather(pending, return_exceptions=True)
        admission.release(cancelled)
        assert admission.pixels == 60 and admission.requests == 2
        with pytest.raises(ApiError) as caught:
            await admission.reserve(admission.admit(), 101)
        assert caught.value.status == 413
        return admission

    admission = asyncio.run(scenario())
    assert admission.requests == 3


@IM_DEPRECATED
def test_undecodable_images_are_400_not_500():
    cases = {"TIFF with SRATIONAL strip offsets": (tiff_with_srational_strip_offsets(), "truncated or corrupt"),
             "IM": (saved(Image.new("RGB", (8, 8)), "IM"), "not an image"),
             "SPIDER": (saved(Image.new("F", (8, 8)), "SPIDER"), "not an image"),
             "DDS": (saved(Image.new("RGBA", (8, 8)), "DDS"), "not an image")}
    for name, (data, fragment) in cases.items():
        with pytest.raises(ApiError) as caught:
            uploads.decode_image(uploads.open_image(data, MAX_PIXELS))
        assert caught.value.status == 400 and fragment in caught.value.message, (name, caught.value.message)
    for width, height in ((20_000, 20_000), (1_000, 2_000)):  # over Pillow's own limit, and over ours only
        with pytest.raises(ApiError) as caught:
            uploads.open_image(png_header_only(width, height), MAX_PIXELS)
        assert caught.value.status == 413 and f"limit of {MAX_PIXELS} (--max-pixels)" in caught.value.message
        assert "178956970" not in caught.value.message  # Pillow's limit is not the service's
    for body, content_type, fragment in (many_fields(40_000) + ("more than 16 parts",),
                                         nested_multipart(1500) + ("without a file part",)):
        with pytest.raises(ApiError) as caught:
            uploads.image_bytes(body, content_type)
        assert caught.value.status == 400 and fragment in caught.value.message, caught.value.message


# --------------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-hostile") / "b0"
    Segformer.from_config("b0", num_labels=150, seed=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(checkpoint):
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "ray[serve]")')
    local = LocalServer(checkpoint, SERVER_ARGS)
    local.start()
    yield local
    left = local.stop()
    local.cleanup()
    assert not left, f"processes left running after the server stopped: {left}"


def post(server, path: str, data: bytes, headers: dict | None = None):
    return server.call("POST", path, data, {"Content-Type": "application/octet-stream", **(headers or {})},
                       timeout_s=CALL_TIMEOUT_S)


def assert_still_serving(server) -> None:
    status, _, body = post(server, "/v1/segment?output=json&size=32", random_png(20, 30, 99))
    assert status == 200 and json.loads(body)["height"] == 20, body[:300]


def test_startup_says_what_it_does_and_discloses_no_path(server, checkpoint):
    """Case 8 (a checkpoint path disclosed by GET /v1/model), and the startup's progress lines."""
    log = server.log_text()
    lines = ["starting Ray", "deploying 1 model replica", "verifies it against the reference",
             "model replica 1 of 1 ready", "ready at"]
    assert all(line in log for line in lines), log[-2000:]
    assert [log.index(line) for line in lines] == sorted(log.index(line) for line in lines)
    status, _, body = server.call("GET", "/v1/model")
    assert status == 200 and json.loads(body)["model"] == "b0"
    # a 150-class checkpoint that names no class: its own LABEL_i names, never a dataset's unasked
    assert [entry["name"] for entry in json.loads(body)["classes"]] == [f"LABEL_{index}" for index in range(150)]
    assert str(checkpoint).encode() not in body and str(checkpoint.parent).encode() not in body


def test_slow_body_408_and_stalled_bodies_take_no_slot(server):
    """Case 1: a body that never finishes is cut off at the request's deadline (408, connection closed); while
    more stalled bodies than --max-queue are open, other requests are served; a request head trickling in and an
    idle connection are closed after --idle-timeout-s."""
    stalled = []
    for _ in range(6):
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        connection.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n12345678")
        stalled.append(connection)
    try:
        assert_still_serving(server)
        answer = raw_exchange(server.port, [b"POST /v1/segment?timeout_s=1 HTTP/1.1\r\nHost: x\r\n"
                                            b"Content-Length: 200000\r\n\r\n12345678"])
        assert status_of(answer) == 408 and b"not received within 1 s" in answer, answer[:300]
    finally:
        for connection in stalled:
            connection.close()
    trickle = [b"POST /v1/segment HTTP/1.1\r\n"] + [b"X-Slow: %d\r\n" % i for i in range(60)]
    answer = raw_exchange(server.port, trickle, pause_s=0.5)
    assert status_of(answer) == 408 and b"--idle-timeout-s" in answer, answer[:300]
    assert raw_exchange(server.port, []) == b""  # an idle connection: closed, nothing said


def test_timed_out_requests_cancel_their_work(server):
    """Case 2: requests cut off by their deadline (504) are dropped from the replica's queue: a request sent right
    after them waits in the replica for at most the one forward already running, not for theirs. (Compared with
    the service's own per-stage timings, so the machine's speed does not matter.)"""
    heavy = random_png(64, 64, 3)
    status, headers, _ = post(server, "/v1/segment?size=1024", heavy)
    assert status == 200
    forward_ms = timings(headers)["forward"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(server, "/v1/segment?size=1024&timeout_s=0.3", heavy), range(4)))
        assert [status for status, _, _ in answers] == [504] * 4, [(s, b[:200]) for s, _, b in answers]
        status, headers, body = post(server, "/v1/segment?size=32", random_png(20, 20, 4))
    assert status == 200, body[:300]
    assert timings(headers)["queue"] < 2.5 * forward_ms, (headers["server-timing"], forward_ms)


def test_disconnected_clients_cancel_their_work(server):
    """As case 2, for clients that hang up instead of timing out: their queued work is dropped."""
    heavy = random_png(64, 64, 3)
    status, headers, _ = post(server, "/v1/segment?size=1024", heavy)
    assert status == 200
    forward_ms = timings(headers)["forward"]
    request = (b"POST /v1/segment?size=1024 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
               b"Content-Length: %d\r\n\r\n" % len(heavy)) + heavy
    connections = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(4)]
    for connection in connections:
        connection.sendall(request)
    time.sleep(0.3)
    for connection in connections:
        connection.close()
    status, headers, body = post(server, "/v1/segment?size=32", random_png(20, 20, 4))
    assert status == 200, body[:300]
    assert timings(headers)["queue"] < 2.5 * forward_ms, (headers["server-timing"], forward_ms)


def test_multipart_floods_and_nesting_answer_400(server):
    """Case 3 (40,000 fields) and case 6's multipart nested 1500 deep: 400 at once, parsed off the event loop."""
    for (body, content_type), fragment in ((many_fields(40_000), "more than 16 parts"),
                                           (nested_multipart(1500), "without a file part")):
        status, headers, answer = post(server, "/v1/segment", body, {"Content-Type": content_type})
        json_error(status, headers, answer, 400, fragment)
    status, _, _ = server.call("GET", "/healthz")
    assert status == 200


def test_pixels_in_flight_are_bounded(server):
    """Case 4: admission counts pixels. Four 700x700 images at once (--max-queue), with room for two (image + work
    size) in --max-pixels-in-flight: all are served, and the service says that some waited for pixels."""
    image = png(np.full((700, 700, 3), 90, dtype=np.uint8))
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(server, "/v1/segment?size=512", image), range(4)))
    assert [status for status, _, _ in answers] == [200] * 4, [(s, b[:200]) for s, _, b in answers]
    waits = [timings(headers)["admit"] for _, headers, _ in answers]
    assert max(waits) >= 1.0, waits
    status, headers, body = post(server, "/v1/segment?size=1100x1100", random_png(16, 16, 5))
    json_error(status, headers, body, 413, "--max-pixels")


def test_huge_header_431(server):
    """Case 5: a 32 MiB header is refused with 431 once the head passes 64 KiB; serving goes on."""
    chunks = [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "] + [b"a" * 2**20] * 32 + [b"\r\n\r\n"]
    answer = raw_exchange(server.port, chunks)
    assert status_of(answer) == 431 and b"application/json" in answer and b"over 64 KiB" in answer, answer[:300]
    assert_still_serving(server)


@IM_DEPRECATED
def test_undecodable_images_through_the_server(server):
    """Case 6: any image the decoder cannot read is a 400 (TIFF SRATIONAL offsets, IM, DDS, SPIDER)."""
    for data in (tiff_with_srational_strip_offsets(), saved(Image.new("RGB", (8, 8)), "IM"),
                 saved(Image.new("RGBA", (8, 8)), "DDS"), saved(Image.new("F", (8, 8)), "SPIDER")):
        status, headers, body = post(server, "/v1/segment", data)
        json_error(status, headers, body, 400)
    assert_still_serving(server)


def test_head_answers_like_get(server):
    """Case 9: HEAD on the routes a load balancer probes: 200, GET's content type, no body."""
    for path in ("/healthz", "/readyz", "/v1/model", "/", "/v2/health/ready"):
        got_status, got_headers, _ = server.call("GET", path)
        status, headers, body = server.call("HEAD", path)
        assert (status, body) == (200, b"") and got_status == 200, (path, status, body[:100])
        assert headers["content-type"] == got_headers["content-type"], path


def test_huge_query_string_414_json(server):
    """Case 10: a 100 KB query string: 414 in JSON, whether the head arrives at once or in pieces."""
    line = b"GET /healthz?" + b"q" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    for chunks in ([line], [line[i:i + 4096] for i in range(0, len(line), 4096)]):
        answer = raw_exchange(server.port, chunks)
        assert status_of(answer) == 414 and b"application/json" in answer and b"URL" in answer, answer[:300]
    status, headers, body = server.call("GET", "/-/routes")
    json_error(status, headers, body, 404)


def cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_sigint_finishes_requests_in_flight(server):
    """Case 7: SIGINT while a forward runs: that request is answered 200, one sent after the signal gets 503, the
    server exits 0 and every process it started is gone; from start to stop it printed none of the library lines a
    plain start and stop used to (Ray's token-authentication note, the raylet's lines on Serve's killed controller,
    colour codes)."""
    processes = server.track()
    replica = server.find("SegmentModel")[0]
    with ThreadPoolExecutor(1) as pool:
        before = cpu_ticks(replica)
        in_flight = pool.submit(post, server, "/v1/segment?size=1024", random_png(64, 64, 6))
        deadline = time.monotonic() + 30
        while cpu_ticks(replica) < before + 5 and time.monotonic() < deadline:  # the replica is running it
            time.sleep(0.01)
        os.kill(server.process.pid, signal.SIGINT)
        time.sleep(0.2)
        status, headers, body = post(server, "/v1/segment?size=32", random_png(16, 16, 7))
        json_error(status, headers, body, 503, "shutting down")
        status, _, body = in_flight.result(timeout=CALL_TIMEOUT_S)
    assert status == 200, body[:300]
    left = server.stop(signal.SIGINT)
    assert not left and server.process.returncode == 0, (left, server.log_tail())
    assert not alive(processes)
    log = server.log_text()
    assert "draining: 1 request in flight" in log
    noise = ("Token authentication", "(raylet)", "ServeController", "\x1b[")
    assert not [line for line in log.splitlines() if any(mark in line for mark in noise)], log
