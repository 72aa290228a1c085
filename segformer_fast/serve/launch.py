"""Starting and stopping the service (:func:`start`, :class:`Running`): start a local Ray instance (or join
``--ray ADDRESS``), deploy ``serve.app``'s ingress and model replicas, wait until every replica's engine is built
and verified, and shut everything down again.

Importing this module needs the ``serve`` extra (ray[serve]); ``cli.serve`` imports it when the command runs.
"""

import contextlib
import dataclasses
import logging

import ray
from ray import serve

from segformer_fast.serve.api import ServeSettings
from segformer_fast.serve.app import APP_NAME, SegmentIngress, SegmentModel, logger, quiet_logging


@dataclasses.dataclass
class Running:
    """A deployed service: its URL and model description; :meth:`stop` takes it down (and the Ray it started)."""

    url: str
    description: dict
    started_ray: bool
    stopped: bool = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if not ray.is_initialized():
            return
        with contextlib.suppress(Exception):
            if self.started_ray:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        ray.shutdown()


def build_application(settings: ServeSettings, gpus_per_replica: float = 0.0):
    """The Serve application: the ingress bound to ``settings.replicas`` model replicas."""
    values = dataclasses.asdict(settings)
    model = SegmentModel.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=max(settings.max_queue, settings.max_batch_size),
        graceful_shutdown_timeout_s=5,
        **quiet_logging(),
    ).bind(values)
    return SegmentIngress.options(
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        # the ingress admits max_queue requests itself and answers the rest with 503 at once
        max_ongoing_requests=settings.max_queue + 16,
        graceful_shutdown_timeout_s=5,
        **quiet_logging(),
    ).bind(values, model)


def start(settings: ServeSettings, *, host: str, port: int, address: str | None = None,
          temp_dir: str | None = None, num_cpus: int | None = None) -> Running:
    """Start (or join) Ray, deploy, and return once every model replica's engine is built and verified. Whatever
    fails or is interrupted half way is taken down again before the error propagates."""
    running = Running(url=f"http://{_url_host(host)}:{port}/", description={}, started_ray=False)
    logger.setLevel(logging.WARNING)  # this process's Serve messages: warnings and errors only
    try:
        if not ray.is_initialized():
            options = {"include_dashboard": False, "logging_level": logging.WARNING}
            if address:
                ray.init(address=address, **options)
            else:
                running.started_ray = True
                ray.init(address="local", num_cpus=num_cpus, _temp_dir=temp_dir, **options)
        gpus = 0.0
        if settings.device.startswith("cuda") or (settings.device == "auto"
                                                   and ray.cluster_resources().get("GPU", 0) > 0):
            gpus = 1.0
        serve.start(http_options={"host": host, "port": port}, **quiet_logging())
        handle = serve.run(build_application(settings, gpus), name=APP_NAME, route_prefix="/", **quiet_logging())
        running.description = handle.model_info.remote().result(timeout_s=120)
    except BaseException:
        running.stop()
        raise
    return running


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
