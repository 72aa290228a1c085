"""The HTTP API (FastAPI): ``POST /v1/segment``, ``GET /v1/model``, ``/healthz``, ``/readyz``, the page at ``/``,
``/openapi.json`` and an offline ``/docs``; the Open Inference Protocol's ``/v2`` routes come from
``serve.oip_routes``. Every route that answers GET answers HEAD too (load balancers probe with HEAD); every error
is JSON, ``{"error": "..."}``, never a traceback.

A request's work is ``serve.pipeline``'s (deadline, admission, decoding, the model replica, outputs); this module
maps HTTP onto it. The app runs in the ``segformer-fast serve`` process itself (``serve.launch``), in front of the
model replicas' Ray Serve deployment: no Ray Serve proxy and no ingress replica between the client and the work.

Importing this module needs the ``serve`` extra (FastAPI comes with ray[serve]).
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from segformer_fast import __version__
from segformer_fast.render.palettes import palette_for
from segformer_fast.serve import openapi
from segformer_fast.serve.api import RETRY_AFTER_S, ApiError, ServeSettings, parse_query, render
from segformer_fast.serve.oip_routes import oip_router
from segformer_fast.serve.pipeline import Pipeline, Upload, logger
from segformer_fast.serve.uploads import client_gone, read_body

DESCRIPTION = """SegFormer semantic segmentation over HTTP (segformer-fast).

`POST /v1/segment` with the image as the raw body (any `Content-Type`) or as a `multipart/form-data` file field;
the Open Inference Protocol (v2 REST) under `/v2`. Errors are JSON: `{"error": "..."}`."""
GET_HEAD = ["GET", "HEAD"]


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _read_page() -> str:
    return resources.files("segformer_fast.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def docs_page(schema: dict) -> str:
    """``/docs``: the routes and their parameters from the OpenAPI schema, as a page with no outside assets."""
    rows = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            parameters = ", ".join(f"<code>{html.escape(p['name'])}</code>" for p in operation.get("parameters", []))
            rows.append(f"<tr><td><code>{method.upper()} {html.escape(path)}</code></td>"
                        f"<td>{html.escape(operation.get('summary', ''))}</td><td>{parameters}</td></tr>")
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>segformer-fast API</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:1.5rem}td{padding:.2rem .6rem;vertical-align:top;"
            "border-bottom:1px solid #eee}</style></head><body><h1>segformer-fast API</h1>"
            "<p>The full description is the OpenAPI schema at <a href=\"/openapi.json\"><code>/openapi.json</code>"
            "</a> (open it in any OpenAPI viewer); this page needs nothing from the network.</p>"
            f"<table>{''.join(rows)}</table></body></html>")


def create_app(settings: ServeSettings, pipeline: Pipeline, description: dict,
               readiness: Callable[[], Awaitable[tuple]]) -> FastAPI:
    """The API over ``pipeline`` (model replicas described by ``description``); ``readiness()``: (ready, detail)."""
    app = FastAPI(title="segformer-fast", version=__version__, description=DESCRIPTION, docs_url=None,
                  redoc_url=None)
    page = _read_page()
    names = [entry["name"] for entry in description["classes"]]
    palette = palette_for(description["num_labels"])

    @app.exception_handler(ApiError)
    async def _api_error(request, error: ApiError):
        return error_response(error.status, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, error):
        return error_response(400, "invalid request: " + "; ".join(str(item.get("msg")) for item in error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error):
        return error_response(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected_error(request, error):
        logger.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, "internal error (the server's log has the details)")

    @app.api_route("/", methods=GET_HEAD, response_class=HTMLResponse, include_in_schema=False)
    async def show_page():
        return HTMLResponse(page)

    @app.api_route("/docs", methods=GET_HEAD, response_class=HTMLResponse, include_in_schema=False)
    async def show_docs():
        return HTMLResponse(docs_page(app.openapi()))

    @app.api_route("/healthz", methods=GET_HEAD, summary="the service answers", responses=openapi.STATUS)
    async def healthz():
        return {"status": "ok"}

    @app.api_route("/readyz", methods=GET_HEAD, summary="every model replica is running and the service takes "
                   "requests", responses=openapi.READY)
    async def readyz():
        if pipeline.admission.draining:
            return error_response(503, "not ready: shutting down", {"Retry-After": str(RETRY_AFTER_S)})
        ready, detail = await readiness()
        if not ready:
            return error_response(503, f"not ready: {detail}", {"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ready", "replicas": detail}

    @app.api_route("/v1/model", methods=GET_HEAD, summary="the model served: variant, classes, dtype, device, "
                   "version, and the service's settings", responses=openapi.MODEL)
    async def get_model():
        service = {key: value for key, value in settings.__dict__.items() if key != "model"}
        service["max_pixels_in_flight"] = settings.pixels_in_flight
        return {**description, "service": service}

    @app.post("/v1/segment", summary="segment an image", response_class=Response, openapi_extra=openapi.SEGMENT)
    async def segment(request: Request):
        parsed = parse_query(request.query_params.multi_items(), settings)
        content_type = request.headers.get("content-type")

        async def read():
            try:
                return Upload(data=await read_body(request, settings), content_type=content_type)
            except ClientDisconnect:  # nobody to answer; no error to log
                raise ApiError(400, "the client disconnected before sending its whole body") from None

        def output(labels, image, logits):
            return render(parsed.output, image, labels, names, palette)

        answer = await pipeline.run(parsed, read, output, keep_image=parsed.output in ("overlay", "overlay_json"),
                                    disconnected=lambda: client_gone(request))
        body, media_type = answer.output
        return Response(body, media_type=media_type, headers={"X-Batch-Size": str(answer.batch),
                                                              "Server-Timing": answer.server_timing()})

    app.include_router(oip_router(settings, pipeline, description, readiness))
    app.openapi = lambda: openapi.finish(app)
    return app
