"""``serve``'s request logic without a server (``serve.api``, ``serve.uploads``), and the command's checks before
Ray starts."""

import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segformer_fast import Segformer
from segformer_fast.cli import main
from segformer_fast.render.palettes import palette_for
from segformer_fast.serve import api, uploads

from bench_common.local_server import free_port
from serve_support import multipart, png_bytes, random_png

MAX_PIXELS = 1_000_000


# -------------------------------------------------------------------------------------- serve.api, without a server
SETTINGS = api.ServeSettings(model="x", max_body_mb=1, max_pixels=MAX_PIXELS)


def test_parse_query_defaults_and_resize_as_segment():
    request = api.parse_query([], SETTINGS)
    assert (request.output, request.mode, request.resize_arguments()) == ("labels", "whole", {"size": (512, 512)})
    assert request.timeout_s == SETTINGS.request_timeout_s
    assert api.parse_query([("mode", "slide")], SETTINGS).resize_arguments() == {"size": None}
    assert api.parse_query([("size", "96x128")], SETTINGS).target_size(10, 20) == (96, 128)
    assert api.parse_query([("size", "64")], SETTINGS).target_size(10, 20) == (64, 64)
    assert api.parse_query([("size", "none")], SETTINGS).target_size(10, 20) == (10, 20)
    keep = api.parse_query([("short_side", "64"), ("max_long_side", "100")], SETTINGS)
    assert keep.target_size(50, 200) == (32, 128)  # scale min(100/200, 64/50): 25 x 100, rounded up to 32
    assert api.parse_query([("timeout_s", "1e9")], SETTINGS).timeout_s == SETTINGS.request_timeout_s


@pytest.mark.parametrize("items, fragment", [
    ([("bogus", "1")], "unknown parameter 'bogus'"),
    ([("output", "mask")], "unknown output 'mask'"),
    ([("mode", "fast")], "unknown mode 'fast'"),
    ([("size", "0")], "positive integer"),
    ([("size", "1x2x3")], "size must be"),
    ([("short_side", "x")], "short_side must be"),
    ([("max_long_side", "64")], "needs short_side"),
    ([("size", "64"), ("short_side", "64")], "not both"),
    ([("output", "json"), ("output", "labels")], "more than once"),
    ([("timeout_s", "nan")], "timeout_s"),
    ([("timeout_s", "-1")], "timeout_s"),
])
def test_parse_query_refuses_with_400(items, fragment):
    with pytest.raises(api.ApiError) as caught:
        api.parse_query(items, SETTINGS)
    assert caught.value.status == 400 and fragment in caught.value.message


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    return uploads.decode_image(uploads.open_image(data, max_pixels))


def test_decode_image_refusals():
    cases = [(b"", 400, "empty"), (b"GIF89a-no", 400, "not an image"), (b"hello world", 400, "not an image"),
             (random_png(40, 40, 0)[:90], 400, "truncated")]
    for data, status, fragment in cases:
        with pytest.raises(api.ApiError) as caught:
            decode(data)
        assert caught.value.status == status and fragment in caught.value.message, (data[:20], caught.value)
    bomb = png_bytes(np.zeros((1100, 1000), dtype=np.uint8))
    with pytest.raises(api.ApiError) as caught:
        decode(bomb)
    assert caught.value.status == 413 and "1000x1100" in caught.value.message
    image = decode(random_png(30, 20, 1))
    assert (image.mode, image.size) == ("RGB", (20, 30))


def test_body_limits_and_multipart():
    with pytest.raises(api.ApiError) as caught:
        uploads.check_declared_length(str(2**20 + 1), SETTINGS)
    assert caught.value.status == 413
    uploads.check_declared_length(str(2**20), SETTINGS)
    image = random_png(8, 8, 2)
    body, content_type = multipart(image)
    assert uploads.image_bytes(body, content_type) == image
    assert uploads.image_bytes(image, "image/png") == image
    with pytest.raises(api.ApiError) as caught:
        uploads.image_bytes(b"", None)
    assert caught.value.status == 400 and "empty body" in caught.value.message
    with pytest.raises(api.ApiError) as caught:
        uploads.image_bytes(b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
                        "multipart/form-data; boundary=b")
    assert caught.value.status == 400 and "file part" in caught.value.message


def test_summary_lists_the_classes_present_most_pixels_first():
    labels = np.array([[1, 1, 2], [1, 0, 1]], dtype=np.uint8)
    result = api.summary(labels, ["a", "b", "c"], palette_for(3))
    assert [(c["id"], c["name"], c["pixels"]) for c in result["classes"]] == [(1, "b", 4), (0, "a", 1), (2, "c", 1)]
    assert result["classes"][0]["share"] == pytest.approx(4 / 6) and (result["height"], result["width"]) == (2, 3)


def test_package_and_cli_import_without_ray():
    code = ("import sys, segformer_fast, segformer_fast.cli, segformer_fast.cli.serve, segformer_fast.serve.api; "
            "print(sorted(m for m in ('ray', 'fastapi', 'starlette', 'segformer_fast.serve.app') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_command_refuses_before_ray_starts(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["serve", "--model", str(empty), "--port", str(free_port())]) == 2
    assert "no weights found" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(empty), "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    for options, message in ((["--replicas", "0"], "--replicas"), (["--max-batch-size", "0"], "max-batch-size"),
                             (["--max-body-mb", "-1"], "max-body-mb"), (["--port", "70000"], "--port")):
        assert main(["serve", "--model", str(empty), "--port", str(free_port()), *options]) == 2
        assert message in capsys.readouterr().err
    nineteen = tmp_path / "b0-19"
    Segformer.from_config("b0", num_labels=19, seed=1).save_pretrained(nineteen)
    assert main(["serve", "--model", str(nineteen), "--port", str(free_port()), "--class-names", "ade20k"]) == 2
    assert "ade20k has 150 classes but the checkpoint predicts 19" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- the server
