"""``segformer-fast serve``'s API fuzzed from its own OpenAPI schema: schemathesis generates requests for every
route and parameter of ``/openapi.json`` (valid and invalid ones, unsupported methods) against a real local
server, and checks every answer: no 5xx, a status and content type the schema declares, a body that matches the
declared schema, ``Allow`` on 405. Also: the schema's parameters carry real examples, and ``/docs`` is a page that
needs nothing from the network.
"""

import json
import subprocess
import sys

import pytest

from segformer_fast import Segformer

from bench_common.local_server import LocalServer

#: every check of schemathesis that applies to an API without authentication or resources to create
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection,unsupported_method,allow_header_conformance")
#: examples per route and method in the fuzzing phase (each a real request; the coverage phase adds its own)
EXAMPLES = 15


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "ray[serve]")')
    folder = tmp_path_factory.mktemp("serve-schema") / "b0"
    Segformer.from_config("b0", num_labels=19, seed=5).save_pretrained(folder)
    local = LocalServer(folder, ["--max-pixels", "300000", "--max-body-mb", "1", "--request-timeout-s", "30"])
    local.start()
    yield local
    left = local.stop()
    local.cleanup()
    assert not left, f"processes left running after the server stopped: {left}"


def test_every_route_answers_as_its_schema_says(server, tmp_path):
    """schemathesis' own command (its pytest plugin does not load under this pytest), all four phases: the
    schema's examples, its coverage cases (boundary and invalid values of every parameter and body), random
    fuzzing, and stateful sequences; a fixed seed, so a failure reproduces."""
    pytest.importorskip("schemathesis", reason="schemathesis is not installed")
    command = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
               "run", server.url + "openapi.json", "--checks", CHECKS, "--max-examples", str(EXAMPLES),
               "--seed", "1", "--workers", "1", "--request-timeout", "60", "--no-color"]
    # its caches (.hypothesis, .schemathesis) go to tmp_path, never into the repository
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert " passed" in output and "failed" not in output.split("SUMMARY")[-1], output[-3000:]


def test_schema_has_examples_and_docs_work_offline(server):
    status, _, body = server.call("GET", "/openapi.json")
    spec = json.loads(body)
    assert status == 200
    parameters = spec["paths"]["/v1/segment"]["post"]["parameters"]
    assert all(p.get("example") not in (None, {}, "") for p in parameters), parameters
    for operations in spec["paths"].values():
        for operation in operations.values():
            assert "422" not in operation["responses"] and "default" in operation["responses"]
    status, headers, page = server.call("GET", "/docs")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/openapi.json" in page and b"/v2/models/{model_name}/infer" in page
    assert b"http://" not in page and b"https://" not in page and b"<script" not in page
