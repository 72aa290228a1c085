"""The reference SegFormer: MiT-B0…B5 encoder + All-MLP decode head in plain PyTorch.

This is the numerical ground truth of the project (exact against transformers and the official NVlabs code, see
docs/DESIGN.md section 3). It favours clarity over speed: the engine (``segformer_fast.optimize``) is the fast path.

Tensor layout conventions: images are (B, 3, H, W); inside a stage tokens are (B, N, C) with N = h * w in
row-major order of the stage grid (h, w).
"""

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from segformer_fast.model import checkpoints, key_families
from segformer_fast.model.config import BATCH_NORM_EPS, MLP_RATIO, PATCH_SIZES, STRIDES, SegformerConfig


def _tokens_to_image(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, h, w) feature map."""
    batch, _, channels = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: strided conv (k7 s4 p3 or k3 s2 p1) with bias, then LayerNorm."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, images: torch.Tensor):
        """images: (B, C_in, H, W) -> tokens (B, h*w, dim), h, w."""
        features = self.proj(images)
        height, width = features.shape[2:]
        tokens = features.flatten(2).transpose(1, 2)
        return self.norm(tokens), height, width


class EfficientAttention(nn.Module):
    """Spatial-reduction multi-head attention: queries from every token, keys/values from a grid reduced by R."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, sr_eps: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim, eps=sr_eps)

    def reduce(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, N, C) -> reduced key/value tokens (B, Nkv, C).

        The SR conv is a non-overlapping patchify whose output grid is floor(h / R) x floor(w / R). On a stage grid
        smaller than R in a direction (inputs under about 29 pixels) it sees the grid zero-padded to R on the
        bottom/right, so there is always at least one key; transformers and the official code raise there.
        """
        if self.sr_ratio == 1:
            return tokens
        image = _tokens_to_image(tokens, height, width)
        pad_h, pad_w = max(0, self.sr_ratio - height), max(0, self.sr_ratio - width)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h))
        reduced = self.sr(image).flatten(2).transpose(1, 2)
        return self.sr_norm(reduced)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, num_tokens, dim = tokens.shape
        kv_tokens = self.reduce(tokens, height, width)
        q = self.q(tokens).reshape(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(kv_tokens).reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(kv_tokens).reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim**-0.5
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        attended = torch.matmul(probs, v).transpose(1, 2).reshape(batch, num_tokens, dim)
        return self.proj(attended)


class MixFFN(nn.Module):
    """fc1 (C -> 4C), depthwise 3x3 conv (padding 1, bias), exact erf GELU, fc2 (4C -> C)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        hidden = self.fc1(tokens)
        hidden = self.dwconv(_tokens_to_image(hidden, height, width)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(hidden))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN1(x)), then x + mixffn(LN2(x))."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, block_eps: float, sr_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=block_eps)
        self.attn = EfficientAttention(dim, num_heads, sr_ratio, sr_eps)
        self.norm2 = nn.LayerNorm(dim, eps=block_eps)
        self.mlp = MixFFN(dim, dim * MLP_RATIO)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens), height, width)
        return tokens + self.mlp(self.norm2(tokens), height, width)


class Stage(nn.Module):
    """Patch embedding, blocks, final LayerNorm; returns the (B, C, h, w) feature map."""

    def __init__(self, config: SegformerConfig, index: int):
        super().__init__()
        dim = config.embed_dims[index]
        in_channels = 3 if index == 0 else config.embed_dims[index - 1]
        eps = config.eps
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, PATCH_SIZES[index], STRIDES[index], eps["patch_embed"])
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads[index], config.sr_ratios[index], eps["block"], eps["sr"])
            for _ in range(config.depths[index])
        )
        self.norm = nn.LayerNorm(dim, eps=eps["stage"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, height, width = self.patch_embed(images)
        for block in self.blocks:
            tokens = block(tokens, height, width)
        tokens = self.norm(tokens)
        return tokens.reshape(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()


class DecodeHead(nn.Module):
    """All-MLP head: per-stage Linear(C_i, D), bilinear resize to the stage-1 grid, concat [c4, c3, c2, c1],
    1x1 conv (no bias) + BatchNorm + ReLU, 1x1 classifier conv. Dropout is identity at eval and omitted."""

    def __init__(self, in_dims, decoder_dim: int, num_labels: int):
        super().__init__()
        self.linear_c = nn.ModuleList(nn.Linear(dim, decoder_dim) for dim in in_dims)
        self.linear_fuse = nn.Conv2d(decoder_dim * len(in_dims), decoder_dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(decoder_dim, eps=BATCH_NORM_EPS)
        self.classifier = nn.Conv2d(decoder_dim, num_labels, 1)

    def forward(self, features) -> torch.Tensor:
        """features: four (B, C_i, h_i, w_i) maps -> logits (B, num_labels, h_1, w_1)."""
        target_size = features[0].shape[2:]
        projected = []
        for feature, linear in zip(features, self.linear_c):
            batch, _, height, width = feature.shape
            tokens = linear(feature.flatten(2).transpose(1, 2))
            image = tokens.transpose(1, 2).reshape(batch, -1, height, width)
            if image.shape[2:] != target_size:
                image = F.interpolate(image, size=target_size, mode="bilinear", align_corners=False)
            projected.append(image)
        fused = self.linear_fuse(torch.cat(projected[::-1], dim=1))
        return self.classifier(F.relu(self.bn(fused)))


class Segformer(nn.Module):
    """SegFormer for semantic segmentation: ``forward(pixel_values (B, 3, H, W)) -> logits (B, K, ceil(H/4),
    ceil(W/4))``. Build with :meth:`from_config` (random weights) or :meth:`from_pretrained` (any supported
    checkpoint). The model is in eval mode after construction."""

    def __init__(self, config: SegformerConfig):
        super().__init__()
        self.config = config
        self.stages = nn.ModuleList(Stage(config, i) for i in range(4))
        self.decode_head = DecodeHead(config.embed_dims, config.decoder_dim, config.num_labels)
        self.eval()

    @classmethod
    def from_config(
        cls, variant: str = "b0", num_labels: int = 150, seed: int = 0, eps_convention: str = "transformers"
    ) -> "Segformer":
        """A model with deterministic random weights (the same for the same arguments on every machine).

        Weights follow the usual inits (truncated-normal linears, fan-out convs); LayerNorm and BatchNorm affine
        parameters and BatchNorm running statistics are randomized away from their defaults so that tests see
        every parameter's effect.
        """
        model = cls(SegformerConfig(variant=variant, num_labels=num_labels, eps_convention=eps_convention))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                random_init_(module, generator)
        return model

    @classmethod
    def from_pretrained(
        cls, source, num_labels: int | None = None, eps_convention: str | None = None, map_location="cpu"
    ) -> "Segformer":
        """Load a checkpoint: a hub-layout folder, a single .safetensors/.bin/.pth/.pt file in any supported key
        family, or a hub id resolved through huggingface_hub's cache (see :func:`checkpoints.read_checkpoint`).

        Raises FileNotFoundError (nothing at ``source``) or ValueError naming the file (unreadable, malformed,
        mismatched keys or shapes, NaN/Inf weights). A backbone-only file gets a deterministic random head, with
        a warning.
        """
        config, state_dict, family, source_name = checkpoints.read_checkpoint(source, num_labels, eps_convention)
        model = cls(config)
        tensors = key_families.from_family(state_dict, family, model.state_dict(), config.variant, source_name)
        checkpoints.check_finite(tensors, source_name, family)
        if not any(name.startswith("decode_head.") for name in tensors):
            warnings.warn(
                f"{source_name}: backbone-only checkpoint ({family} keys): the encoder is loaded, the decode head "
                f"({config.num_labels} classes) is randomly initialized",
                stacklevel=2,
            )
            random_head = cls.from_config(config.variant, config.num_labels, 0, config.eps_convention)
            for name, tensor in random_head.state_dict().items():
                if name.startswith("decode_head."):
                    tensors[name] = tensor
        model.load_state_dict(tensors, strict=False)
        model.source_family = family
        return model.to(map_location)

    @classmethod
    def from_transformers(cls, hf_model) -> "Segformer":
        """The reference (fp32, eval mode, on hf_model's device) with the weights of a transformers
        ``SegformerForSemanticSegmentation``, which is read, never modified."""
        config, state_dict, family, source_name = checkpoints.transformers_checkpoint(hf_model)
        model = cls(config)
        tensors = key_families.from_family(state_dict, family, model.state_dict(), config.variant, source_name)
        model.load_state_dict(tensors, strict=False)
        device = next(hf_model.parameters()).device
        return model.to(device=device, dtype=torch.float32).eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the hub layout (config.json + model.safetensors with the hub's key names) into ``folder``,
        atomically per file, leaving anything else in the folder alone."""
        checkpoints.save_pretrained(self, folder)

    def to_transformers(self):
        """A transformers ``SegformerForSemanticSegmentation`` with this model's weights (needs transformers)."""
        return checkpoints.to_transformers(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.decode_head.classifier.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decode_head.classifier.weight.device

    def extract_features(self, pixel_values: torch.Tensor) -> list:
        """The four stage outputs (B, C_i, h_i, w_i)."""
        features = []
        hidden = pixel_values
        for stage in self.stages:
            hidden = stage(hidden)
            features.append(hidden)
        return features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = check_pixel_values(pixel_values, self.device, self.dtype)
        batch, _, height, width = pixel_values.shape
        if batch == 0:
            return pixel_values.new_empty(0, self.config.num_labels, math.ceil(height / 4), math.ceil(width / 4))
        return self.decode_head(self.extract_features(pixel_values))


def check_pixel_values(pixel_values, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Validate a (B, 3, H, W) floating batch on ``device``; return it cast to ``dtype``.

    Raises TypeError for a non-tensor or a non-floating dtype and ValueError for a wrong rank, channel count,
    empty spatial size or device, each naming what was expected and what came.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor of shape (B, 3, H, W), got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(
            f"pixel_values must have shape (B, 3, H, W), got a {pixel_values.dim()}-D tensor of shape "
            f"{tuple(pixel_values.shape)}"
            + (" (add a batch dimension with .unsqueeze(0))" if pixel_values.dim() == 3 else "")
        )
    if pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must have 3 channels (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
    if pixel_values.shape[2] < 1 or pixel_values.shape[3] < 1:
        raise ValueError(f"pixel_values must have H, W >= 1, got shape {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a floating tensor (float32, float16 or bfloat16), got {pixel_values.dtype}; "
            "normalize images first (segformer_fast.preprocess)"
        )
    if pixel_values.device.type != device.type or (
        device.index is not None and pixel_values.device.index not in (None, device.index)
    ):
        raise ValueError(f"pixel_values are on {pixel_values.device} but the model is on {device}")
    return pixel_values.to(dtype)


def random_init_(module: nn.Module, generator: torch.Generator) -> None:
    """Deterministic random init of one module's own parameters (buffers included for BatchNorm)."""

    def normal(tensor, std, mean=0.0):
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std + mean)

    if isinstance(module, nn.Linear):
        normal(module.weight, 0.02)
        normal(module.bias, 0.02)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        normal(module.weight, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            normal(module.bias, 0.02)
    elif isinstance(module, nn.LayerNorm):
        normal(module.weight, 0.1, 1.0)
        normal(module.bias, 0.1)
    elif isinstance(module, nn.BatchNorm2d):
        normal(module.weight, 0.1, 1.0)
        normal(module.bias, 0.1)
        normal(module.running_mean, 0.1)
        module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
