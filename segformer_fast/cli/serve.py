"""``segformer-fast serve``: its options, and running the service until Ctrl-C or SIGTERM.

The Ray side lives in ``serve.app`` and ``serve.launch`` and is imported when the command runs: ray is an optional
extra (``pip install "ray[serve]"``, the ``serve`` extra), never needed to import the package or to parse the
command line.
"""

from __future__ import annotations

import os
import socket
import sys

from segformer_fast.core.runtime import DTYPES, resolve_device
from segformer_fast.model.segformer import Segformer
from segformer_fast.render.palettes import DATASET_CLASS_NAMES, class_names
from segformer_fast.serve.api import ServeSettings

INSTALL_HINT = 'pip install "ray[serve]" python-multipart'


def register(subparsers) -> None:
    """Register ``serve`` on the ``segformer-fast`` subcommands."""
    parser = subparsers.add_parser(
        "serve", help="an HTTP segmentation service (Ray Serve) with dynamic batching and a page at /",
        description="Serve a checkpoint over HTTP on Ray Serve: POST /v1/segment (labels / overlay PNG, or JSON), "
                    "GET /v1/model, /healthz, /readyz, the Open Inference Protocol (v2 REST) under /v2, a page for "
                    "people at /, OpenAPI at /openapi.json. Starts "
                    "its own local Ray unless --ray ADDRESS names a running cluster; Ctrl-C (or SIGTERM) shuts "
                    "everything it started down.")
    parser.add_argument("--model", required=True, metavar="CK", help="checkpoint: folder, weights file or hub id "
                        "(readable from every replica)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for every "
                        "interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--ray", default=None, metavar="ADDRESS",
                        help="deploy onto the running Ray cluster at ADDRESS (auto, host:6379); default: start a "
                             "local Ray instance, stopped again at exit")
    parser.add_argument("--replicas", type=int, default=1, metavar="N", help="model replicas, one engine each "
                        "(default 1)")
    parser.add_argument("--cpus-per-replica", type=float, default=None, metavar="C",
                        help="CPUs per model replica, also its torch threads (default: this machine's CPUs divided "
                             "among the replicas)")
    parser.add_argument("--max-batch-size", type=int, default=8, metavar="B",
                        help="most images per forward (default 8; 1 turns batching off)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="T",
                        help="how long an idle replica waits after a request for others to join its forward (default "
                             "10 ms; requests that queue during a forward join the next one at once)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="compute dtype (default fp32)")
    parser.add_argument("--device", default="auto", help="auto (cuda where the replica has a GPU), cpu, cuda, "
                        "cuda:N")
    parser.add_argument("--max-body-mb", type=float, default=20.0, metavar="M",
                        help="largest request body in MiB (default 20); larger: 413")
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, metavar="P",
                        help="most pixels of an image, and of the size it is run at (default 4096*4096); a larger "
                             "image (a decompression bomb) is refused with 413 before it is decoded")
    parser.add_argument("--max-queue", type=int, default=64, metavar="Q",
                        help="most requests in flight at once (default 64); more: 503 with Retry-After")
    parser.add_argument("--request-timeout-s", type=float, default=60.0, metavar="S",
                        help="longest a request may take, reading its body included (default 60 s); past it: 504 "
                             "(408 while the body is still arriving)")
    parser.add_argument("--max-pixels-in-flight", type=int, default=None, metavar="P",
                        help="most pixels (each request's image plus the size it runs at) decoded or running at "
                             "once (default 4 x --max-pixels); more wait their turn: this bounds the memory")
    parser.add_argument("--idle-timeout-s", type=float, default=15.0, metavar="S",
                        help="a connection must send each request's headers within this (and is closed when idle "
                             "this long between requests; default 15 s)")
    parser.add_argument("--class-names", choices=sorted(DATASET_CLASS_NAMES), metavar="DATASET",
                        help="show these datasets' class names (ade20k, cityscapes) instead of the checkpoint's own "
                             "(its id2label; LABEL_i where it names none); they must have as many classes as the "
                             "checkpoint")
    parser.add_argument("--temp-dir", default=None, metavar="DIR",
                        help="the local Ray instance's session folder (default: Ray's)")
    parser.set_defaults(func=run)


def settings_from_args(args) -> ServeSettings:
    """The checked settings (ValueError naming the option)."""
    if args.replicas is None or args.replicas < 1:
        raise ValueError(f"--replicas must be a positive integer, got {args.replicas}")
    cpus = args.cpus_per_replica
    if cpus is None:
        cpus = float(max(1, (os.cpu_count() or 1) // args.replicas))
    return ServeSettings(model=str(args.model), dtype=args.dtype, device=args.device, replicas=args.replicas,
                         cpus_per_replica=cpus, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                         max_body_mb=args.max_body_mb, max_pixels=args.max_pixels, max_queue=args.max_queue,
                         request_timeout_s=args.request_timeout_s, max_pixels_in_flight=args.max_pixels_in_flight,
                         idle_timeout_s=args.idle_timeout_s, class_names=args.class_names)


def check_port(host: str, port: int) -> None:
    """ValueError when ``port`` is out of range or taken on ``host`` (checked before Ray starts)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None


def _describe(description: dict, settings: ServeSettings) -> str:
    replicas = f"{settings.replicas} replica{'s' if settings.replicas != 1 else ''}"
    batching = ("batching off" if settings.max_batch_size == 1 else
                f"batches of up to {settings.max_batch_size} within {settings.batch_wait_ms:g} ms")
    return (f"{settings.model} (MiT-{description.get('variant', '?').upper()}, {description.get('num_labels')} "
            f"classes, {description.get('dtype')} on {description.get('device')}, {replicas}, {batching})")


def run(args) -> int:
    """Start the service, print where it listens once every replica is ready, and serve until a signal."""
    settings = settings_from_args(args)
    check_port(args.host, args.port)
    if args.temp_dir is not None and args.ray:
        raise ValueError("--temp-dir applies to the local Ray instance only, not with --ray ADDRESS")
    if not args.ray:
        # on this machine the replicas read the same files: a checkpoint that cannot load fails here, in a line,
        # before Ray starts (on a cluster the path need only exist where the replicas run)
        config = Segformer.from_pretrained(settings.model).config
        class_names(config.id2label, config.num_labels, settings.class_names)  # a dataset of another class count
        resolve_device(settings.device)  # --device cuda where there is none: refused now, not an unplaceable replica
    try:
        from segformer_fast.serve import launch
    except ImportError as error:
        print(f"segformer-fast: serve needs Ray Serve: {INSTALL_HINT}; import failed: {error}", file=sys.stderr)
        return 2

    return launch.run_service(settings, host=args.host, port=args.port, address=args.ray, temp_dir=args.temp_dir,
                              num_cpus=_local_cpus(settings) if not args.ray else None,
                              ready_line=lambda url, description: f"segformer-fast serve: ready at {url} serving "
                              f"{_describe(description, settings)}; Ctrl-C to stop")


def _local_cpus(settings: ServeSettings) -> int:
    """Logical CPUs of the local Ray instance: the machine's, and at least what the replicas ask for."""
    return max(os.cpu_count() or 1, int(-(-settings.replicas * settings.cpus_per_replica // 1)))
