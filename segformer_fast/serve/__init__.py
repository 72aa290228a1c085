"""``segformer-fast serve``: an HTTP segmentation service, model replicas on Ray Serve behind an HTTP front in the
command's own process (``serve.launch``; the API is ``serve.app`` and ``serve.oip_routes``, a request's work
``serve.pipeline``; the command is in ``serve.command``). Importing this package needs nothing beyond the package's
own dependencies."""
