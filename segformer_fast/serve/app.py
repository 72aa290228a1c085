"""The service on Ray Serve: an HTTP ingress (FastAPI) in front of model replicas that batch requests.

- :class:`SegmentModel`: one engine per replica (``optimize``, verified when built). ``segment`` takes a decoded RGB
  image and the checked request; whole-mode requests go through Ray Serve's ``@serve.batch`` queue, and each
  batch is split by preprocessed size, one forward per size (requests of one size that arrive within the wait
  window run as one forward, other sizes in their own). Slide / auto requests run alone. Forwards run on one
  thread of their own, so the replica's event loop keeps taking requests.
- :class:`SegmentIngress`: the HTTP API (``POST /v1/segment``, ``GET /v1/model``, ``/healthz``, ``/readyz``, the
  page at ``/``, OpenAPI at ``/openapi.json``): the body read within its limit, decoded off the event loop,
  handed to a model replica, the result encoded. It admits at most ``max_queue`` requests at once (503 with
  ``Retry-After`` past that), gives each its deadline (504), turns a replica lost mid-request into 503, and never
  sends a traceback (every error is ``{"error": "..."}``).

Starting and stopping the service is ``serve.launch``'s.

Importing this module needs the ``serve`` extra (ray[serve], which brings FastAPI); only ``serve.launch`` imports it,
and ``cli.serve`` imports that when the command runs.
"""


import asyncio
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from ray import exceptions as ray_exceptions
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from segformer_fast import __version__
from segformer_fast.core.runtime import dtype_name, is_out_of_memory, parse_dtype, resolve_device
from segformer_fast.engine.engine import optimize
from segformer_fast.inference.processing import preprocess
from segformer_fast.inference.segment import MODES
from segformer_fast.model.segformer import Segformer
from segformer_fast.render.palettes import palette_for
from segformer_fast.serve.api import (
    OUTPUTS,
    RETRY_AFTER_S,
    ApiError,
    SegmentRequest,
    ServeSettings,
    body_too_large,
    check_declared_length,
    check_work_size,
    class_names,
    decode_image,
    hex_color,
    image_bytes,
    labels_png,
    overlay_png,
    parse_query,
    summary,
)

APP_NAME = "segformer-fast"
MODEL_DEPLOYMENT = "SegmentModel"
INGRESS_DEPLOYMENT = "SegmentIngress"
logger = logging.getLogger("ray.serve")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# -------------------------------------------------------------------------------------------------- model replica
@serve.deployment(name=MODEL_DEPLOYMENT)
class SegmentModel:
    """One engine; whole-image requests are batched by preprocessed size."""

    def __init__(self, settings: dict):
        self.settings = ServeSettings(**settings)
        torch.set_num_threads(max(1, int(self.settings.cpus_per_replica)))
        device = resolve_device(self.settings.device)
        model = Segformer.from_pretrained(self.settings.model).to(device=device)
        self.engine = optimize(model, dtype=parse_dtype(self.settings.dtype))  # verified against the reference
        config = model.config
        self.palette = palette_for(config.num_labels)
        self.description = {
            "model": self.settings.model,
            "variant": config.variant,
            "num_labels": config.num_labels,
            "classes": [{"id": index, "name": name, "color": hex_color(self.palette[index])}
                        for index, name in enumerate(class_names(config.id2label, config.num_labels))],
            "dtype": dtype_name(self.engine.dtype),
            "device": str(self.engine.device),
            "kernels": self.engine.kernels,
            "version": __version__,
            "verification": {key: value for key, value in (self.engine.last_verification or {}).items()
                             if key in ("max_abs_error", "tolerance")},
        }
        self.forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.segment_batch.set_max_batch_size(self.settings.max_batch_size)
        self.segment_batch.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1000)

    def describe(self) -> dict:
        return self.description

    async def segment(self, image: np.ndarray, request: SegmentRequest) -> tuple:
        """(labels (H, W) uint8 / uint16 at the image's size, images in the forward that computed them)."""
        if request.mode == "whole":
            result = await self.segment_batch((image, request.target_size(image.shape[0], image.shape[1])))
            if isinstance(result, Exception):
                raise result
            return result
        loop = asyncio.get_running_loop()
        labels = await loop.run_in_executor(self.forward_thread, self._segment_alone, image, request)
        return labels, 1

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def segment_batch(self, items: list) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.forward_thread, self._run_batch, items)

    def _run_batch(self, items: list) -> list:
        """One forward per preprocessed size, exactly as ``engine.segment`` runs a group of same-size images. A
        group that fails (out of memory, say) fails its own requests only: their entries are the exception."""
        groups: dict = {}
        for index, (_, target) in enumerate(items):
            groups.setdefault(target, []).append(index)
        results: list = [None] * len(items)
        for target, indices in groups.items():
            try:
                with torch.no_grad():
                    images = [Image.fromarray(items[index][0], "RGB") for index in indices]
                    pixel_values, sizes = preprocess(images, size=target, size_divisor=None,
                                                     device=self.engine.device, dtype=self.engine.dtype,
                                                     return_sizes=True)
                    for index, labels in zip(indices, self.engine.whole_labels(pixel_values, sizes)):
                        results[index] = (self._compact(labels), len(indices))
            except Exception as error:
                for index in indices:
                    results[index] = error
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return results

    def _segment_alone(self, image: np.ndarray, request: SegmentRequest) -> np.ndarray:
        labels = self.engine.segment(Image.fromarray(image, "RGB"), mode=request.mode, **request.resize_arguments())
        return self._compact(labels)

    def _compact(self, labels: torch.Tensor) -> np.ndarray:
        dtype = np.uint8 if self.engine.config.num_labels <= 256 else np.uint16
        return labels.cpu().numpy().astype(dtype)


# -------------------------------------------------------------------------------------------------------- the API
DESCRIPTION = """SegFormer semantic segmentation over HTTP (segformer-fast).

`POST /v1/segment` with the image as the raw body (any `Content-Type`) or as a `multipart/form-data` file field.
Errors are JSON: `{"error": "..."}`."""

app = FastAPI(title="segformer-fast", version=__version__, description=DESCRIPTION, docs_url="/docs",
              redoc_url=None)


@app.exception_handler(RequestValidationError)
async def _validation_error(request, error):
    return _error(400, "invalid request: " + "; ".join(str(item.get("msg")) for item in error.errors()))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request, error):
    return _error(error.status_code, str(error.detail), getattr(error, "headers", None))


@app.exception_handler(Exception)
async def _unexpected_error(request, error):
    logger.exception("unexpected error answering %s %s", request.method, request.url.path)
    return _error(500, "internal error (the server's log has the details)")


ERROR_SCHEMA = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}
SEGMENT_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": "the image (PNG, JPEG, WebP, BMP, TIFF, GIF, ...): the raw body, or a multipart file field",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "image": {"type": "string", "format": "binary"}}, "required": ["image"]}},
        },
    },
    "responses": {
        "200": {"description": "labels / overlay: a PNG; json: the classes present",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                            "application/json": {"schema": {"type": "object"}}}},
        "400": {"description": "not an image, empty, truncated, unknown parameter or value", "content": ERROR_SCHEMA},
        "413": {"description": "body over --max-body-mb, or image over --max-pixels", "content": ERROR_SCHEMA},
        "503": {"description": "over the queue (see Retry-After), or a replica was lost", "content": ERROR_SCHEMA},
        "504": {"description": "no result within the request timeout", "content": ERROR_SCHEMA},
    },
}


def _read_page() -> str:
    return resources.files("segformer_fast.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def _replica_lost(error: BaseException) -> bool:
    lost = tuple(getattr(ray_exceptions, name) for name in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                                        "ActorUnschedulableError", "WorkerCrashedError",
                                                        "NodeDiedError")
                 if hasattr(ray_exceptions, name))
    return isinstance(error, lost)


def _cause(error: BaseException) -> BaseException:
    """The replica's own exception inside a RayTaskError, else ``error``."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def _deployment_ready() -> tuple:
    """(ready, detail) from Serve's status: the application running and every model replica up."""
    status = serve.status()
    application = status.applications.get(APP_NAME)
    if application is None:
        return False, "application not deployed"
    deployment = application.deployments.get(MODEL_DEPLOYMENT)
    if str(getattr(application.status, "value", application.status)) != "RUNNING" or deployment is None:
        return False, f"application {getattr(application.status, 'value', application.status)}"
    states = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
    running = states.get("RUNNING", 0)
    if str(getattr(deployment.status, "value", deployment.status)) != "HEALTHY" or running < 1:
        return False, f"model replicas {states}"
    return True, running


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(app)
class SegmentIngress:
    def __init__(self, settings: dict, model):
        self.settings = ServeSettings(**settings)
        self.model = model
        self.page = _read_page()
        self.codec = ThreadPoolExecutor(max_workers=2, thread_name_prefix="codec")
        self.in_flight = 0
        self.description = None

    async def _describe(self) -> dict:
        if self.description is None:
            self.description = await self.model.describe.remote()
        return self.description

    async def model_info(self) -> dict:
        """The model replicas' description and the service's settings (``GET /v1/model``)."""
        info = dict(await self._describe())
        info["service"] = {key: value for key, value in dataclasses.asdict(self.settings).items() if key != "model"}
        return info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return HTMLResponse(self.page)

    @app.get("/healthz", summary="the service answers")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz", summary="every model replica is running",
             responses={503: {"description": "not ready", "content": ERROR_SCHEMA}})
    async def readyz(self):
        loop = asyncio.get_running_loop()
        try:
            ready, detail = await asyncio.wait_for(loop.run_in_executor(self.codec, _deployment_ready), 10)
        except Exception as error:  # the controller unreachable counts as not ready
            ready, detail = False, f"status unavailable: {type(error).__name__}"
        if not ready:
            return _error(503, f"not ready: {detail}", {"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ready", "replicas": detail}

    @app.get("/v1/model", summary="the model served: variant, classes, dtype, device, version")
    async def get_model(self):
        try:
            return await asyncio.wait_for(self.model_info(), 30)
        except Exception as error:
            return self._failure(error)

    @app.post("/v1/segment", summary="segment an image", openapi_extra=SEGMENT_OPENAPI,
              response_class=Response)
    async def segment(
        self,
        request: Request,
        output: str | None = Query(None, description="labels (default: a palette PNG of class ids, as `segment` "
                                   "writes it), overlay (PNG), json (classes present, names, pixel counts)",
                                   json_schema_extra={"enum": list(OUTPUTS)}),
        mode: str | None = Query(None, description="whole (default; batched), slide or auto, as in `segment`",
                                 json_schema_extra={"enum": list(MODES)}),
        size: str | None = Query(None, description="N, HxW or none (own size); default 512x512 in whole mode, "
                                 "own size in slide / auto"),
        short_side: str | None = Query(None, description="keep-ratio resize to this short side (mmseg), sides "
                                       "rounded up to multiples of 32"),
        max_long_side: str | None = Query(None, description="with short_side: cap the long side"),
        timeout_s: str | None = Query(None, description="seconds to wait at most (capped by the server's "
                                      "--request-timeout-s); 504 past it"),
    ):
        if self.in_flight >= self.settings.max_queue:
            return _error(503, f"over capacity: {self.in_flight} requests in flight (--max-queue "
                               f"{self.settings.max_queue}); retry later", {"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += 1
        try:
            parsed = parse_query(request.query_params.multi_items(), self.settings)
            body = await self._read_body(request)
            return await asyncio.wait_for(self._segment(parsed, body, request.headers.get("content-type")),
                                          parsed.timeout_s)
        except ApiError as error:
            return _error(error.status, error.message, error.headers)
        except asyncio.TimeoutError:
            return _error(504, f"no result within {parsed.timeout_s:g} s (timeout_s / --request-timeout-s)")
        except Exception as error:
            return self._failure(error)
        finally:
            self.in_flight -= 1

    def _failure(self, error: BaseException) -> JSONResponse:
        """A JSON answer for what went wrong on the way to a replica or inside it; never a traceback."""
        cause = _cause(error)
        if _replica_lost(error) or _replica_lost(cause):
            return _error(503, "the model replica handling this request was lost; it is being restarted, retry",
                          {"Retry-After": str(RETRY_AFTER_S)})
        if is_out_of_memory(cause):
            return _error(503, "out of memory running this request; retry later or send a smaller image",
                          {"Retry-After": str(RETRY_AFTER_S)})
        logger.error("request failed: %s: %s", type(cause).__name__, cause)
        return _error(500, f"internal error ({type(cause).__name__}; the server's log has the details)")

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to be over the limit (before decoding anything)."""
        check_declared_length(request.headers.get("content-length"), self.settings)
        limit = self.settings.max_body_bytes
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise body_too_large(self.settings)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _segment(self, parsed: SegmentRequest, body: bytes, content_type: str | None) -> Response:
        loop = asyncio.get_running_loop()
        data = image_bytes(body, content_type)
        image = await loop.run_in_executor(self.codec, decode_image, data, self.settings.max_pixels)
        check_work_size(parsed, image, self.settings.max_pixels)
        description = await self._describe()
        labels, batch = await self.model.segment.remote(np.asarray(image), parsed)
        headers = {"X-Batch-Size": str(batch)}
        if parsed.output == "json":
            names = [entry["name"] for entry in description["classes"]]
            result = await loop.run_in_executor(self.codec, summary, labels, names,
                                                palette_for(description["num_labels"]))
            return JSONResponse(result, headers=headers)
        palette = palette_for(description["num_labels"])
        if parsed.output == "overlay":
            png = await loop.run_in_executor(self.codec, overlay_png, image, labels, palette)
        else:
            png = await loop.run_in_executor(self.codec, labels_png, labels, palette)
        return Response(png, media_type="image/png", headers=headers)


def quiet_logging() -> dict:
    """Serve's per-request access log off where this Ray can say so (its warnings and errors are kept)."""
    try:
        from ray.serve.schema import LoggingConfig
    except ImportError:
        return {}
    return {"logging_config": LoggingConfig(enable_access_log=False, log_level="WARNING")}
