"""The reference model against transformers, through every key family, plus its input contract."""

import re

import pytest
import torch

from segformer_fast.model import key_families
from segformer_fast.model.config import VARIANTS
from segformer_fast.model.segformer import Segformer

from helpers import assert_relative_close, random_transformers_model

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")

ODD_SIZES = [(61, 83), (97, 45)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_transformers_every_family(variant, tmp_path):
    """transformers' own random model -> saved by transformers -> loaded by us in every key family."""
    seed = 1 + sorted(VARIANTS).index(variant)
    hf_model = random_transformers_model(variant, num_labels=7, seed=seed)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = Segformer.from_pretrained(tmp_path / "hf")
    assert ours.config.variant == variant and ours.config.num_labels == 7

    loaded = {"hub folder": ours}
    reference_state = ours.state_dict()
    for family in key_families.FAMILIES:
        path = tmp_path / f"{family}.pth"
        torch.save({"state_dict": key_families.to_family(reference_state, family), "meta": {}}, path)
        loaded[f"{family} file"] = Segformer.from_pretrained(path, eps_convention="transformers")
    ours.save_pretrained(tmp_path / "ours")
    round_trip = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "ours").eval()

    generator = torch.Generator().manual_seed(seed)
    for height, width in ODD_SIZES:
        pixels = torch.randn(2, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = hf_model(pixel_values=pixels).logits
            for name, model in loaded.items():
                assert_relative_close(model(pixels), expected, 1e-5, f"{variant} {name} {height}x{width}")
            assert_relative_close(
                round_trip(pixel_values=pixels).logits, expected, 1e-5, f"{variant} save_pretrained round trip"
            )


def test_official_eps_is_distinguished(tmp_path):
    """Official checkpoints use LayerNorm eps 1e-6 in blocks and stage norms: small-variance activations show it."""
    model = Segformer.from_config("b0", num_labels=5, seed=4)
    with torch.no_grad():
        # Tiny patch-embed LayerNorm gains make the block LayerNorm inputs' variance ~1e-6, comparable to eps.
        for stage in model.stages:
            stage.patch_embed.norm.weight.mul_(1e-3)
            stage.patch_embed.norm.bias.mul_(1e-3)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": key_families.to_family(model.state_dict(), "official")}, path)
    official = Segformer.from_pretrained(path)
    assert official.config.eps_convention == "official"
    assert official.stages[0].blocks[0].norm1.eps == 1e-6 and official.stages[0].norm.eps == 1e-6
    assert official.stages[0].patch_embed.norm.eps == 1e-5 and official.stages[0].blocks[0].attn.sr_norm.eps == 1e-5

    # Independent check: transformers with its block and stage LayerNorm eps set to the official values.
    hf_model = model.to_transformers()
    for name, module in hf_model.named_modules():
        if "layernorm_" in name or re.fullmatch(r"segformer\.stages\.\d\.layer_norm", name):
            module.eps = 1e-6
    pixels = torch.randn(2, 3, 65, 71, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(pixel_values=pixels).logits
        got_official = official(pixels)
        got_transformers_eps = model(pixels)
    assert_relative_close(got_official, expected, 1e-5, "official eps vs transformers with eps 1e-6")
    difference = float((got_transformers_eps - got_official).abs().max())
    assert difference > 1e-2 * float(expected.abs().max()), f"eps 1e-5 vs 1e-6 differ by only {difference:.3e}"


def test_from_config_is_deterministic():
    first = Segformer.from_config("b0", num_labels=3, seed=11).state_dict()
    second = Segformer.from_config("b0", num_labels=3, seed=11).state_dict()
    other = Segformer.from_config("b0", num_labels=3, seed=12).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["stages.0.blocks.0.attn.q.weight"], other["stages.0.blocks.0.attn.q.weight"])
    bn = Segformer.from_config("b0", seed=11).decode_head.bn
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("height,width", [(1, 1), (5, 40), (31, 29), (64, 96)])
def test_output_shape_and_values_any_size(height, width):
    model = Segformer.from_config("b0", num_labels=4, seed=0)
    pixels = torch.randn(2, 3, height, width)
    with torch.no_grad():
        logits = model(pixels)
        single = model(pixels[1:])
    assert logits.shape == (2, 4, -(-height // 4), -(-width // 4))
    assert torch.isfinite(logits).all()
    # batch elements are independent
    assert_relative_close(logits[1:], single, 1e-5, "batch independence")


def test_channels_last_input_matches_contiguous():
    model = Segformer.from_config("b0", num_labels=4, seed=0)
    pixels = torch.randn(2, 3, 53, 67)
    with torch.no_grad():
        assert_relative_close(model(pixels.to(memory_format=torch.channels_last)), model(pixels), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_tolerance(dtype):
    from helpers import assert_within_tolerance

    model = Segformer.from_config("b0", num_labels=4, seed=0)
    pixels = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        reference = model.double()(pixels.double())
        low = model.to(dtype)(pixels.to(dtype))
    assert low.dtype == dtype
    assert_within_tolerance(low.float(), reference, dtype, what=f"reference model in {dtype}")


def test_input_contract_errors():
    model = Segformer.from_config("b0", num_labels=4, seed=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*3-D.*unsqueeze"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="3 channels.*\\(1, 4, 32, 32\\)"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError, match="floating.*torch.uint8"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1.0]])
    with pytest.raises(ValueError, match="meta.*cpu"):
        model(torch.randn(1, 3, 32, 32, device="meta"))


def test_empty_batch_returns_empty_logits():
    model = Segformer.from_config("b0", num_labels=4, seed=0)
    logits = model(torch.randn(0, 3, 37, 50))
    assert logits.shape == (0, 4, 10, 13)
