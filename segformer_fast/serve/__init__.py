"""The HTTP segmentation service behind ``segformer-fast serve`` (the verb is ``cli.serve``): model replicas on Ray
Serve (``replica``, batched by ``batching``) behind an HTTP front in the command's own process (``launch`` starts,
drains and stops everything; ``server`` is uvicorn with the head limits; ``app`` and ``oip_routes`` the API), each
request's work from body to output in ``pipeline`` (``uploads``, ``admission``, ``oip``, ``api``). The modules that
need Ray or FastAPI are imported when the command runs: importing this package needs nothing beyond the package's
own dependencies.

Imports from the project: render, engine, inference, ops, model, core, segformer_fast.
"""
