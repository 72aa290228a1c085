"""``segformer-fast serve``: an HTTP segmentation service on Ray Serve (see ``serve.app``; the command is in
``serve.command``, the request and response logic, free of Ray, in ``serve.api``). Importing this package needs
nothing beyond the package's own dependencies."""
