"""The model replicas, a Ray Serve deployment: one engine each (``optimize``, verified when built).

:meth:`SegmentModel.segment` takes the array the HTTP front prepared (``serve.uploads.model_input``: in whole mode
the image already resized to its work size, exactly as ``preprocess`` resizes it) and returns the labels at the
image's own size. Whole-mode requests are batched (``serve.batching``: greedily, what queued during a forward runs
next); each batch is split by work size, one forward per size. Slide / auto requests, and logits, run alone.
Forwards run on one thread of their own, so the replica's event loop keeps taking requests. A request cancelled
while queued (its client's deadline passed, or its client left) is dropped before it runs. Every answer carries
the replica's own timings (seconds queued, seconds in the forward) for the front's ``Server-Timing`` header.

Importing this module needs the ``serve`` extra (ray[serve]); ``serve.launch`` imports it when the command runs.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ray import serve

from segformer_fast import __version__
from segformer_fast.core.runtime import dtype_name, parse_dtype, resolve_device
from segformer_fast.engine.engine import optimize
from segformer_fast.inference.processing import preprocess
from segformer_fast.model.segformer import Segformer
from segformer_fast.ops import extension
from segformer_fast.render.palettes import class_names, palette_for
from segformer_fast.serve.api import SegmentRequest, ServeSettings, hex_color, public_model_name
from segformer_fast.serve.batching import Batcher

MODEL_DEPLOYMENT = "SegmentModel"


@serve.deployment(name=MODEL_DEPLOYMENT)
class SegmentModel:
    """One engine; whole-image requests are batched by work size."""

    def __init__(self, settings: dict):
        self.settings = ServeSettings(**settings)
        torch.set_num_threads(max(1, int(self.settings.cpus_per_replica)))
        device = resolve_device(self.settings.device)
        model = Segformer.from_pretrained(self.settings.model).to(device=device)
        self.engine = optimize(model, dtype=parse_dtype(self.settings.dtype))  # verified against the reference
        config = model.config
        self.palette = palette_for(config.num_labels)
        self.label_dtype = np.uint8 if config.num_labels <= 256 else np.uint16
        self.description = {
            "model": public_model_name(self.settings.model),
            "variant": config.variant,
            "num_labels": config.num_labels,
            "classes": [{"id": index, "name": name, "color": hex_color(self.palette[index])}
                        for index, name in enumerate(class_names(config.id2label, config.num_labels,
                                                                   self.settings.class_names))],
            "dtype": dtype_name(self.engine.dtype),
            "device": str(self.engine.device),
            "kernels": self.engine.kernels,
            "version": __version__,
            "verification": {key: value for key, value in (self.engine.last_verification or {}).items()
                             if key in ("max_abs_error", "tolerance")},
        }
        self.forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.batcher = Batcher(self._run_batch, self.forward_thread, self.settings.max_batch_size,
                               self.settings.batch_wait_ms / 1000)

    def describe(self) -> dict:
        return self.description

    async def segment(self, array: np.ndarray, request: SegmentRequest, size: tuple) -> tuple:
        """(labels (H, W) uint8 / uint16 at ``size`` = the image's (H, W), images in the forward that computed
        them, {"queue": s, "forward": s}). ``array``: (h, w, 3) uint8, the image at its work size in whole mode."""
        arrived = time.perf_counter()
        if request.mode == "whole":
            result = await self.batcher.submit((array, tuple(size), arrived))
            if isinstance(result, Exception):
                raise result
            return result
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.forward_thread, self._segment_alone, array, request, arrived)

    async def logits(self, array: np.ndarray, request: SegmentRequest, size: tuple) -> tuple:
        """(logits (K, h/4, w/4) float32, labels as :meth:`segment` gives them, timings) of one whole-mode image
        at its work size ``array`` (h, w, 3) uint8, from one forward (not batched)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.forward_thread, self._logits_alone, array, tuple(size),
                                          time.perf_counter())

    def _run_batch(self, items: list) -> list:
        """One forward per work size, as ``engine.segment`` runs a group of same-size images; each label map is
        compacted as soon as it is computed (never a batch of int64 maps at once). A group that fails (out of
        memory, say) fails its own requests only: their entries are the exception."""
        groups: dict = {}
        for index, (array, _, _) in enumerate(items):
            groups.setdefault(array.shape[:2], []).append(index)
        results: list = [None] * len(items)
        for (height, width), indices in groups.items():
            started = time.perf_counter()
            try:
                with torch.no_grad():
                    pixel_values = preprocess([items[index][0] for index in indices], size=(height, width),
                                              size_divisor=None, device=self.engine.device, dtype=self.engine.dtype)
                    logits = self.engine.logits(pixel_values)
                    del pixel_values
                    labels = []
                    for position, index in enumerate(indices):
                        image_height, image_width = items[index][1]
                        labels.append(self._compact(extension.upsample_argmax(
                            logits[position:position + 1], image_height, image_width)[0]))
            except Exception as error:
                for index in indices:
                    results[index] = error
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            forward = time.perf_counter() - started
            for index, label_map in zip(indices, labels):
                results[index] = (label_map, len(indices), {"queue": started - items[index][2], "forward": forward})
        return results

    def _segment_alone(self, array: np.ndarray, request: SegmentRequest, arrived: float) -> tuple:
        started = time.perf_counter()
        labels = self._compact(self.engine.segment(array, mode=request.mode, **request.resize_arguments()))
        return labels, 1, {"queue": started - arrived, "forward": time.perf_counter() - started}

    def _logits_alone(self, array: np.ndarray, size: tuple, arrived: float) -> tuple:
        started = time.perf_counter()
        with torch.no_grad():
            pixel_values = preprocess(array, size=array.shape[:2], size_divisor=None, device=self.engine.device,
                                      dtype=self.engine.dtype)
            logits = self.engine.logits(pixel_values)
            labels = self._compact(extension.upsample_argmax(logits, size[0], size[1])[0])
        return (logits[0].float().cpu().numpy(), labels,
                {"queue": started - arrived, "forward": time.perf_counter() - started})

    def _compact(self, labels: torch.Tensor) -> np.ndarray:
        return labels.cpu().numpy().astype(self.label_dtype)
