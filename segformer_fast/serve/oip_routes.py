"""The Open Inference Protocol's v2 REST routes (``serve.oip`` has the protocol itself): server live / ready /
metadata, model metadata / ready, and ``infer``, with or without ``/versions/1``, on the same pipeline, replicas and
batching as ``/v1/segment``. Errors are the protocol's error form, ``{"error": "..."}`` (the app's handlers).

Importing this module needs the ``serve`` extra (FastAPI comes with ray[serve]).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from segformer_fast import __version__
from segformer_fast.serve import oip, openapi
from segformer_fast.serve.api import RETRY_AFTER_S, ApiError, ServeSettings
from segformer_fast.serve.pipeline import Pipeline, Upload
from segformer_fast.serve.uploads import client_gone, read_body

GET_HEAD = ["GET", "HEAD"]
#: The path parameters, documented with the one value each that names something (others answer 404).
NAME = Path(description="the model's name", json_schema_extra={"enum": [oip.MODEL_NAME]})
VERSION = Path(description="the model's version", json_schema_extra={"enum": [oip.MODEL_VERSION]})


def oip_router(settings: ServeSettings, pipeline: Pipeline, description: dict,
               readiness: Callable[[], Awaitable[tuple]]) -> APIRouter:
    router = APIRouter(tags=["Open Inference Protocol (v2)"])
    metadata = oip.model_metadata(description)

    async def ready_or_503(answer: dict) -> dict:
        if pipeline.admission.draining:
            raise ApiError(503, "not ready: shutting down", {"Retry-After": str(RETRY_AFTER_S)})
        ready, detail = await readiness()
        if not ready:
            raise ApiError(503, f"not ready: {detail}", {"Retry-After": str(RETRY_AFTER_S)})
        return answer

    @router.api_route("/v2", methods=GET_HEAD, summary="server metadata", responses=openapi.OIP_SERVER)
    async def server_metadata():
        return oip.server_metadata(__version__)

    @router.api_route("/v2/health/live", methods=GET_HEAD, summary="the server is live",
                      responses=openapi.OIP_LIVE)
    async def server_live():
        return {"live": True}

    @router.api_route("/v2/health/ready", methods=GET_HEAD, summary="the server and its model are ready",
                      responses=openapi.OIP_READY)
    async def server_ready():
        return await ready_or_503({"ready": True})

    @router.api_route("/v2/models/{model_name}", methods=GET_HEAD, summary="model metadata: inputs and outputs",
                      responses=openapi.OIP_MODEL)
    async def model_metadata(model_name: str = NAME):
        oip.check_model(model_name)
        return metadata

    @router.api_route("/v2/models/{model_name}/versions/{model_version}", methods=GET_HEAD,
                      summary="model metadata of one version", responses=openapi.OIP_MODEL)
    async def model_version_metadata(model_name: str = NAME, model_version: str = VERSION):
        oip.check_model(model_name, model_version)
        return metadata

    @router.api_route("/v2/models/{model_name}/ready", methods=GET_HEAD, summary="the model is ready",
                      responses=openapi.OIP_MODEL_READY)
    async def model_ready(model_name: str = NAME):
        oip.check_model(model_name)
        return await ready_or_503({"name": oip.MODEL_NAME, "ready": True})

    @router.api_route("/v2/models/{model_name}/versions/{model_version}/ready", methods=GET_HEAD,
                      summary="the model's version is ready", responses=openapi.OIP_MODEL_READY)
    async def model_version_ready(model_name: str = NAME, model_version: str = VERSION):
        oip.check_model(model_name, model_version)
        return await ready_or_503({"name": oip.MODEL_NAME, "ready": True})

    async def infer(model_name: str, model_version: str | None, request: Request) -> Response:
        oip.check_model(model_name, model_version)
        try:
            body = await asyncio.wait_for(read_body(request, settings), settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body was not received within {settings.request_timeout_s:g} s",
                           {"Connection": "close"}) from None
        except ClientDisconnect:  # nobody to answer; no error to log
            raise ApiError(400, "the client disconnected before sending its whole body") from None
        header_length = request.headers.get(oip.HEADER_LENGTH)
        loop = asyncio.get_running_loop()
        parsed = await loop.run_in_executor(pipeline.codec, oip.parse_infer, body, header_length, settings)
        del body
        upload = Upload(data=parsed.data, pixels=parsed.pixels)
        parsed.data = parsed.pixels = None

        async def read():
            return upload

        def output(labels, image, logits):
            return oip.infer_response(parsed, labels, logits, description["num_labels"])

        answer = await pipeline.run(parsed.segment, read, output, logits="logits" in parsed.outputs,
                                    disconnected=lambda: client_gone(request))
        content, headers = answer.output
        headers = {**headers, "X-Batch-Size": str(answer.batch), "Server-Timing": answer.server_timing()}
        return Response(content, headers=headers)  # headers carry the Content-Type (JSON, or binary after JSON)

    @router.post("/v2/models/{model_name}/infer", summary="segment an image (inputs image_bytes or image)",
                 response_class=JSONResponse, openapi_extra=openapi.OIP_INFER)
    async def model_infer(request: Request, model_name: str = NAME):
        return await infer(model_name, None, request)

    @router.post("/v2/models/{model_name}/versions/{model_version}/infer", summary="segment an image with a "
                 "version of the model", response_class=JSONResponse, openapi_extra=openapi.OIP_INFER)
    async def model_version_infer(request: Request, model_name: str = NAME, model_version: str = VERSION):
        return await infer(model_name, model_version, request)

    return router
