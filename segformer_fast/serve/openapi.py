"""The OpenAPI description of the service's routes: parameters with real examples, request bodies, and a JSON
schema for every JSON answer, so that a client generated from ``/openapi.json`` (or a fuzzer checking answers
against it) sees exactly what the service sends. Any status not listed for a route is an error of the
``default`` form, ``{"error": "..."}``. (FastAPI is imported here: the ``serve`` extra.)
"""

from __future__ import annotations

from fastapi.openapi.utils import get_openapi

from segformer_fast.serve.api import OUTPUT_HELP
from segformer_fast.serve.uploads import FORMATS

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}},
         "additionalProperties": False}
ERROR_JSON = {"application/json": {"schema": ERROR}}
DEFAULT = {"description": "an error: 4xx for the request, 503 over capacity / shutting down / replica lost (with "
                          "Retry-After), 504 past the deadline", "content": ERROR_JSON}
NOT_READY = {"description": "not ready (with Retry-After)", "content": ERROR_JSON}


def _json(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _object(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required or properties)}


INTEGER, NUMBER, STRING, BOOLEAN = ({"type": "integer"}, {"type": "number"}, {"type": "string"}, {"type": "boolean"})
STRINGS = {"type": "array", "items": STRING}
CLASS = _object({"id": INTEGER, "name": STRING, "color": STRING})
SUMMARY = _object({"height": INTEGER, "width": INTEGER, "classes": {"type": "array", "items": _object(
    {"id": INTEGER, "name": STRING, "color": STRING, "pixels": INTEGER, "share": NUMBER})},
    "overlay_png": {"type": "string", "contentEncoding": "base64"}}, ("height", "width", "classes"))

STATUS = {200: _json("the service answers", _object({"status": {"type": "string", "enum": ["ok"]}}))}
READY = {200: _json("ready", _object({"status": {"type": "string", "enum": ["ready"]}, "replicas": INTEGER})),
         503: NOT_READY}
MODEL = {200: _json("the model and the service's settings", _object(
    {"model": STRING, "variant": STRING, "num_labels": INTEGER, "classes": {"type": "array", "items": CLASS},
     "dtype": STRING, "device": STRING, "kernels": STRING, "version": STRING, "verification": {"type": "object"},
     "service": {"type": "object"}}))}


def _query(name: str, description: str, example: str, enum: tuple = ()) -> dict:
    schema = {"type": "string", **({"enum": list(enum)} if enum else {})}
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema,
            "example": example}


BINARY = {"type": "string", "format": "binary"}
#: What a segmentation request may meet once its input is accepted.
RUNNING_ERRORS = {
    "408": {"description": "the body did not arrive within the request's deadline", "content": ERROR_JSON},
    "503": {"description": "over --max-queue, shutting down, out of memory, or a replica lost (Retry-After)",
            "content": ERROR_JSON},
    "504": {"description": "no result within timeout_s / --request-timeout-s", "content": ERROR_JSON},
}
SEGMENT = {
    "parameters": [
        _query("output", "; ".join(f"{name}: {text}" for name, text in OUTPUT_HELP.items()), "overlay",
               tuple(OUTPUT_HELP)),
        _query("mode", "whole (default; batched), slide or auto, as in `segment`", "whole",
               ("whole", "slide", "auto")),
        _query("size", "N, HxW or none (own size); default 512x512 in whole mode, own size in slide / auto",
               "512x512"),
        _query("short_side", "keep-ratio resize to this short side (mmseg), sides rounded up to multiples of 32",
               "512"),
        _query("max_long_side", "with short_side: cap the long side", "2048"),
        _query("timeout_s", "seconds to wait at most (capped by the server's --request-timeout-s); 504 past it",
               "30"),
    ],
    "requestBody": {
        "required": True,
        "description": f"the image ({', '.join(FORMATS)}): the raw body, or a multipart file field",
        "content": {
            "application/octet-stream": {"schema": BINARY},
            "image/*": {"schema": BINARY},
            "multipart/form-data": {"schema": {"type": "object", "properties": {"image": BINARY},
                                               "required": ["image"]}},
        },
    },
    "responses": {
        "200": {"description": "labels / overlay: a PNG; json / overlay_json: the classes present",
                "content": {"image/png": {"schema": BINARY}, "application/json": {"schema": SUMMARY}}},
        "400": {"description": "not an image, empty, truncated, unknown parameter or value", "content": ERROR_JSON},
        "413": {"description": "body over --max-body-mb; image, or the size asked for, over --max-pixels",
                "content": ERROR_JSON},
        **RUNNING_ERRORS,
    },
}

TENSOR = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": STRING, "datatype": STRING, "shape": {"type": "array", "items": INTEGER},
    "parameters": {"type": "object"}, "data": {"type": "array"}}}
OIP_SERVER = {200: _json("server metadata", _object({"name": STRING, "version": STRING, "extensions": STRINGS}))}
OIP_LIVE = {200: _json("live", _object({"live": BOOLEAN}))}
OIP_READY = {200: _json("ready", _object({"ready": BOOLEAN})), 503: NOT_READY}
OIP_MODEL = {200: _json("the model's inputs and outputs", _object(
    {"name": STRING, "versions": STRINGS, "platform": STRING, "inputs": {"type": "array", "items": TENSOR},
     "outputs": {"type": "array", "items": TENSOR}, "parameters": {"type": "object"}})),
    404: {"description": "no such model or version", "content": ERROR_JSON}}
OIP_MODEL_READY = {200: _json("ready", _object({"name": STRING, "ready": BOOLEAN})), 503: NOT_READY,
                   404: {"description": "no such model or version", "content": ERROR_JSON}}
OIP_INFER = {
    "requestBody": {
        "required": True,
        "description": "an infer request: JSON, or (binary-data extension) JSON of Inference-Header-Content-Length "
                       "bytes followed by the binary tensors",
        "content": {
            "application/json": {"schema": _object({"id": STRING, "parameters": {"type": "object"},
                                                    "inputs": {"type": "array", "items": TENSOR},
                                                    "outputs": {"type": "array", "items": {"type": "object"}}},
                                                   ("inputs",)),
                                 "example": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2, 3],
                                                         "data": list(range(12))}],
                                             "outputs": [{"name": "labels"}]}},
            "application/octet-stream": {"schema": BINARY},
        },
    },
    "responses": {
        "200": {"description": "the outputs asked for: JSON, or JSON followed by binary outputs",
                "content": {"application/json": {"schema": _object(
                    {"model_name": STRING, "model_version": STRING, "id": STRING,
                     "outputs": {"type": "array", "items": TENSOR}}, ("model_name", "outputs"))},
                    "application/octet-stream": {"schema": BINARY}}},
        "400": {"description": "a bad tensor: name, datatype, shape, data; unknown parameter or output",
                "content": ERROR_JSON},
        "404": {"description": "no such model or version", "content": ERROR_JSON},
        "413": {"description": "body over --max-body-mb; image, or the size asked for, over --max-pixels",
                "content": ERROR_JSON},
        **RUNNING_ERRORS,
    },
}


def finish(app) -> dict:
    """The app's schema (built once): FastAPI's, with its unused validation-error answers (422; the service
    answers 400) replaced by the ``default`` error answer on every operation."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                operation["responses"]["default"] = DEFAULT
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        if "components" in schema and not components:
            schema.pop("components")
        app.openapi_schema = schema
    return app.openapi_schema
