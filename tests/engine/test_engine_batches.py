"""The README's batch rule: an image's logits do not depend on the other images of its batch beyond the fp32
tolerance rule (1e-4 x max |logits|), so its labels can differ between batch compositions (a plain run, --ray,
torchrun) only at near ties, pixels whose two best classes are within twice the logits' difference."""

import torch
import torch.nn.functional as F

from segformer_fast import Segformer, optimize, preprocess

from helpers import assert_within_tolerance

SIZE = (96, 128)


def _alone_and_batched(engine, pixels):
    with torch.inference_mode():
        alone = torch.cat([engine.logits(pixels[i:i + 1]) for i in range(len(pixels))])
        batched = engine.logits(pixels)
        reordered = engine.logits(pixels.flip(0)).flip(0)
    return alone, batched, reordered


def test_logits_of_an_image_do_not_depend_on_its_batch():
    engine = optimize(Segformer.from_config("b0", num_labels=150, seed=4))
    pixels = torch.randn(5, 3, *SIZE, generator=torch.Generator().manual_seed(7))
    alone, batched, reordered = _alone_and_batched(engine, pixels)
    for other in (batched, reordered):
        assert_within_tolerance(other, alone, torch.float32, what="batched logits against each image alone")


def test_labels_differ_between_batches_only_at_near_ties():
    """segment() of a batch of same-size images (one forward) against each image segmented alone: any pixel whose
    label differs has its two best upsampled logits within twice the largest logit difference."""
    engine = optimize(Segformer.from_config("b0", num_labels=150, seed=5))
    images = [torch.randint(0, 256, (*SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)).numpy()
              for i in range(4)]
    batched = engine.segment(images, size=None)
    for image, labels in zip(images, batched):
        alone = engine.segment(image, size=None)
        differ = alone != labels
        if differ.any():
            with torch.inference_mode():
                logits = engine.logits(preprocess(image, size=SIZE))
                logits = F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=False)[0]
            top2 = logits.topk(2, dim=0).values
            gap = (top2[0] - top2[1])[differ]
            bound = 2 * 1e-4 * float(logits.abs().max())
            assert float(gap.max()) <= bound, (int(differ.sum()), float(gap.max()), bound)
        assert differ.float().mean() <= 1e-3
