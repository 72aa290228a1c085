"""The HTTP segmentation service on Ray Serve behind ``segformer-fast serve`` (the verb is ``cli.serve``): request
checks and responses without Ray (``api``), the ingress and batching model replicas (``app``) and starting and
stopping them (``launch``), which need the ``serve`` extra and are imported when the command runs. Importing this
package needs nothing beyond the package's own dependencies.

Imports from the project: render, engine, inference, model, core, segformer_fast.
"""
