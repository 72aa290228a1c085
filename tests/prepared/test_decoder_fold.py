"""The exact decoder fold (segformer_fast.prepared.decoder_fold) against the reference DecodeHead."""

import pytest
import torch

from segformer_fast.model.config import VARIANTS, SegformerConfig
from segformer_fast.model.segformer import DecodeHead, random_init_
from segformer_fast.prepared.decoder_fold import FoldedDecodeHead, fold_decode_head

from bench_common.folded_decode import folded_decode, folded_decode_ref, project_features
from helpers import assert_within_tolerance

# Stage grids of a 123 x 77 image (k7 s4 p3, then k3 s2 p1): odd sizes, non-integer resize ratios.
STAGE_SIZES = ((31, 20), (16, 10), (8, 5), (4, 3))


def random_head(variant: str, num_labels: int = 150, seed: int = 0) -> DecodeHead:
    config = SegformerConfig(variant=variant, num_labels=num_labels)
    head = DecodeHead(config.embed_dims, config.decoder_dim, num_labels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in head.modules():
            random_init_(module, generator)
    return head.eval()


def random_features(variant: str, batch: int, dtype: torch.dtype, seed: int = 1, sizes=STAGE_SIZES) -> list:
    generator = torch.Generator().manual_seed(seed)
    dims = VARIANTS[variant][0]
    return [torch.randn(batch, c, h, w, generator=generator).to(dtype) for c, (h, w) in zip(dims, sizes)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fold_matches_reference_head(variant):
    head = random_head(variant).double()
    features = random_features(variant, batch=3, dtype=torch.float64)
    with torch.no_grad():
        reference = head(features)
    folded64 = fold_decode_head(head, dtype=torch.float64)
    assert relative_error(folded_decode_ref(features, folded64), reference) <= 1e-10

    folded32 = fold_decode_head(head, dtype=torch.float32)
    assert folded32.dtype == torch.float32
    features32 = [f.float() for f in features]
    assert relative_error(folded_decode_ref(features32, folded32), reference) <= 1e-5
    # The fast path (projections at own resolution + fused_decode, kernel or fallback) under the tolerance rule.
    assert_within_tolerance(
        folded_decode(features32, folded32), reference, torch.float32,
        eager=folded_decode_ref(features32, folded32), what=f"{variant} folded_decode",
    )


def test_fold_shapes_and_block_order():
    head = random_head("b0", num_labels=19)
    folded = fold_decode_head(head)
    assert isinstance(folded, FoldedDecodeHead)
    assert [tuple(w.shape) for w in folded.weights] == [(256, 32), (256, 64), (256, 160), (256, 256)]
    assert tuple(folded.bias.shape) == (256,) and tuple(folded.cls_weight.shape) == (19, 256)
    assert tuple(folded.cls_bias.shape) == (19,)
    assert folded.decoder_dim == 256 and folded.num_labels == 19
    # Zeroing the linear_fuse block that sees stage 1 (channels 3D:4D) must zero the stage-1 folded weight only.
    with torch.no_grad():
        head.linear_fuse.weight[:, 3 * 256 :] = 0
    folded = fold_decode_head(head)
    assert float(folded.weights[0].abs().max()) == 0.0
    assert all(float(w.abs().max()) > 0 for w in folded.weights[1:])


def test_project_features_is_channels_last():
    head = random_head("b1")
    folded = fold_decode_head(head)
    for batch in (1, 2):
        features = random_features("b1", batch=batch, dtype=torch.float32)
        projected = project_features(features, folded)
        for feature, weight, p in zip(features, folded.weights, projected):
            assert p.is_contiguous() and p.shape == (batch, *feature.shape[2:], 256)
            expected = torch.einsum("bchw,dc->bhwd", feature.double(), weight.double())
            assert relative_error(p, expected) <= 1e-5


def test_fold_of_fp64_then_cast_equals_direct_cast():
    head = random_head("b2", num_labels=7)
    direct = fold_decode_head(head, dtype=torch.bfloat16)
    via64 = fold_decode_head(head, dtype=torch.float64).to(torch.bfloat16)
    for a, b in zip(direct.weights + (direct.bias,), via64.weights + (via64.bias,)):
        assert torch.equal(a, b)
