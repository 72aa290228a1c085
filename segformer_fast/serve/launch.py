"""Running the service (:func:`run_service`): start a local Ray instance (or join ``--ray ADDRESS``), deploy the
model replicas (``serve.replica``) on Ray Serve with its HTTP proxy off, serve the API (``serve.app``) from this
process on uvicorn (``serve.server``) through a handle to the replicas, and on SIGINT / SIGTERM drain and stop.

- **Startup** says what it is doing, one line each: starting Ray, building and verifying the engine (and each
  replica as it comes up), ready with the URL.
- **Shutdown**: the first signal drains: new requests get 503 (``Connection: close``), those in flight finish
  (each within its own deadline, at most ``--request-timeout-s``), then the server, the replicas and the Ray it
  started stop; a second signal stops at once. The whole shutdown is bounded by ``SHUTDOWN_LIMIT_S``.

Importing this module needs the ``serve`` extra (ray[serve]); ``cli.serve`` imports it when the command runs.
"""

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve

from segformer_fast.serve.api import ServeSettings
from segformer_fast.serve.app import create_app
from segformer_fast.serve.pipeline import Pipeline
from segformer_fast.serve.replica import MODEL_DEPLOYMENT, SegmentModel
from segformer_fast.serve.server import make_server

APP_NAME = "segformer-fast"
#: The longest a shutdown may take before the command gives up waiting and exits anyway.
SHUTDOWN_LIMIT_S = 90
#: Seconds a readiness answer is reused (many probes a second share one question to Ray Serve).
READY_CACHE_S = 1.0
#: How often Ray Serve checks each replica's health (its default, 10 s, left /readyz stale for seconds).
HEALTH_CHECK_PERIOD_S = 2.0
logger = logging.getLogger("ray.serve")


def say(text: str) -> None:
    print(f"segformer-fast serve: {text}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Running:
    """Deployed replicas: their handle and description; :meth:`stop` takes them down (and the Ray it started)."""

    handle: object
    description: dict
    started_ray: bool
    stopped: bool = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if not ray.is_initialized():
            return
        if not self.started_ray:  # a cluster of someone else's: take only this application off it
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME)
        # Ray started here goes down whole, Serve's controller with it: serve.shutdown() first only made the raylet
        # print two "ServeController.graceful_shutdown failed ... killed by ray.kill" lines.
        ray.shutdown()


def quiet_logging() -> dict:
    """Serve's per-request access log off where this Ray can say so (its warnings and errors are kept)."""
    try:
        from ray.serve.schema import LoggingConfig
    except ImportError:
        return {}
    return {"logging_config": LoggingConfig(enable_access_log=False, log_level="WARNING")}


def build_model(settings: ServeSettings, gpus_per_replica: float = 0.0):
    """The Serve application: ``settings.replicas`` model replicas (the HTTP front is this process's)."""
    return SegmentModel.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=max(settings.max_queue, settings.max_batch_size),
        graceful_shutdown_timeout_s=5,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        **quiet_logging(),
    ).bind(dataclasses.asdict(settings))


def replica_states() -> tuple:
    """(ready, detail) from Serve's status: the application running and every model replica up."""
    application = serve.status().applications.get(APP_NAME)
    if application is None:
        return False, "application not deployed"
    deployment = application.deployments.get(MODEL_DEPLOYMENT)
    status = str(getattr(application.status, "value", application.status))
    if deployment is None:
        return False, f"application {status}"
    states = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
    running = states.get("RUNNING", 0)
    if status != "RUNNING" or str(getattr(deployment.status, "value", deployment.status)) != "HEALTHY" or not running:
        return False, f"model replicas {states}"
    return True, running


class Readiness:
    """``await readiness()`` -> (ready, detail): Serve's status asked on a thread of its own, at most once per
    ``READY_CACHE_S`` however many probes come (the codec threads never wait for it)."""

    def __init__(self):
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readiness")
        self.answer, self.asked, self.pending = (False, "not asked yet"), -1e9, None

    async def __call__(self) -> tuple:
        if time.monotonic() - self.asked < READY_CACHE_S:
            return self.answer
        if self.pending is None:
            self.pending = asyncio.ensure_future(self._ask())
        return await asyncio.shield(self.pending)

    async def _ask(self) -> tuple:
        try:
            loop = asyncio.get_running_loop()
            self.answer = await asyncio.wait_for(loop.run_in_executor(self.thread, replica_states), 10)
        except Exception as error:  # the controller unreachable counts as not ready
            self.answer = (False, f"status unavailable: {type(error).__name__}")
        finally:
            self.asked, self.pending = time.monotonic(), None
        return self.answer


@contextlib.contextmanager
def replica_progress(total: int):
    """While the replicas build: a line each time another one is up (Serve's status, every second)."""
    done = threading.Event()

    def watch():
        seen = 0
        while not done.wait(1.0):
            with contextlib.suppress(Exception):
                deployment = serve.status().applications[APP_NAME].deployments[MODEL_DEPLOYMENT]
                running = sum(count for state, count in deployment.replica_states.items()
                              if str(getattr(state, "value", state)) == "RUNNING")
                if running > seen:
                    seen = running
                    say(f"model replica {running} of {total} ready")

    watcher = threading.Thread(target=watch, name="replica-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(timeout=5)


def start(settings: ServeSettings, *, address: str | None = None, temp_dir: str | None = None,
          num_cpus: int | None = None) -> Running:
    """Start (or join) Ray and deploy the replicas; return once every replica's engine is built and verified.
    Whatever fails or is interrupted half way is taken down again before the error propagates."""
    running = Running(handle=None, description={}, started_ray=False)
    logger.setLevel(logging.WARNING)  # this process's Serve messages: warnings and errors only
    try:
        if not ray.is_initialized():
            options = {"include_dashboard": False, "logging_level": logging.WARNING}
            if address:
                say(f"joining the Ray cluster at {address}")
                ray.init(address=address, **options)
            else:
                say(f"starting Ray ({num_cpus or os.cpu_count()} CPUs, session folder {temp_dir or 'Ray default'})")
                running.started_ray = True
                # Ray's note that it turned on its default, token authentication, for the instance it starts: a
                # warning on every start that asks nothing of the user (README: "Serving over HTTP").
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
                ray.init(address="local", num_cpus=num_cpus, _temp_dir=temp_dir, **options)
        gpus = 0.0
        if settings.device.startswith("cuda") or (settings.device == "auto"
                                                   and ray.cluster_resources().get("GPU", 0) > 0):
            gpus = 1.0
        serve.start(proxy_location="Disabled", **quiet_logging())
        replicas = f"{settings.replicas} model replica{'s' if settings.replicas != 1 else ''}"
        say(f"deploying {replicas}: each loads the checkpoint, builds the engine and verifies it against the "
            "reference")
        started = time.monotonic()
        with replica_progress(settings.replicas):
            running.handle = serve.run(build_model(settings, gpus), name=APP_NAME, route_prefix=None,
                                       **quiet_logging())
        running.description = running.handle.describe.remote().result(timeout_s=120)
        say(f"{replicas} ready in {time.monotonic() - started:.0f} s")
    except BaseException:
        running.stop()
        raise
    return running


async def serve_http(running: Running, settings: ServeSettings, host: str, port: int,
                     on_ready: Callable[[], None]) -> None:
    """Serve the API on ``host:port`` until SIGINT / SIGTERM, then drain (see the module's docstring)."""
    loop = asyncio.get_running_loop()
    pipeline = Pipeline(settings, running.handle)
    server = make_server(create_app(settings, pipeline, running.description, Readiness()), host, port,
                         settings.idle_timeout_s)
    stopping, forced = asyncio.Event(), asyncio.Event()

    def on_signal():
        if stopping.is_set():  # a second signal: stop now
            server.force_exit = True
            forced.set()
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    serving = asyncio.ensure_future(server.serve(sockets=[listener]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if serving.done():
        serving.result()
        return
    on_ready()
    await stopping.wait()
    in_flight = pipeline.admission.requests
    say(f"draining: {in_flight} request{'s' if in_flight != 1 else ''} in flight, new ones refused with 503")
    drained = asyncio.ensure_future(pipeline.admission.drained(settings.request_timeout_s + 5))
    await asyncio.wait([drained, asyncio.ensure_future(forced.wait())], return_when=asyncio.FIRST_COMPLETED)
    if not (drained.done() and drained.result()):
        say(f"{pipeline.admission.requests} requests still in flight; stopping anyway")
    server.should_exit = True
    await serving


def run_service(settings: ServeSettings, *, host: str, port: int, address: str | None, temp_dir: str | None,
                num_cpus: int | None, ready_line: Callable[[str, dict], str]) -> int:
    """The command: start, print ``ready_line(url, description)`` once the port takes requests, serve until a
    signal, stop everything. Returns the exit code."""
    stopping = threading.Event()

    def interrupt(signum, frame):
        if stopping.is_set():
            return  # already shutting down: the shutdown ends by itself (bounded by SHUTDOWN_LIMIT_S)
        stopping.set()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    running, code = None, 0
    try:
        running = start(settings, address=address, temp_dir=temp_dir, num_cpus=num_cpus)
        url = f"http://{_url_host(host)}:{port}/"
        asyncio.run(serve_http(running, settings, host, port,
                               lambda: print(ready_line(url, running.description), flush=True)))
    except KeyboardInterrupt:
        pass
    except (RuntimeError, OSError) as error:  # a deployment that failed (the replicas' errors are in Ray's log)
        text = str(error).strip()
        print(f"segformer-fast: serve failed: {text.splitlines()[0] if text else type(error).__name__}",
              file=sys.stderr)
        code = 1
    finally:
        stopping.set()
        for sig in previous:
            signal.signal(sig, interrupt)
        say("shutting down")
        watchdog = threading.Timer(SHUTDOWN_LIMIT_S, _give_up)
        watchdog.daemon = True
        watchdog.start()
        try:
            if running is not None:
                running.stop()
        finally:
            watchdog.cancel()
    if code == 0:
        say("stopped")
    return code


def _give_up() -> None:
    say(f"shutdown took over {SHUTDOWN_LIMIT_S} s; exiting")
    os._exit(1)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
