"""The checkpoint key families (docs/DESIGN.md section 3) and their mapping onto the reference's names.

- ``hub``: transformers as published on the hub (``segformer.encoder.block.0.0.attention.self.query.weight``),
- ``transformers5``: transformers >= 5 in memory (``segformer.stages.0.blocks.0.attention.q_proj.weight``),
- ``official``: NVlabs / mmseg-0.x (``backbone.block1.0.attn.q.weight``, merged ``attn.kv``), also
  the ImageNet MiT backbones (``block1.0.attn.q.weight`` without the ``backbone.`` prefix).

Every family is mapped onto the reference model's own parameter names (``stages.0.blocks.0.attn.q.weight``), and a
config is inferred from a family's tensor shapes where a checkpoint has none.
"""

import re

import torch

from segformer_fast.model.config import SegformerConfig, variant_from_shapes

FAMILIES = ("hub", "transformers5", "official")

#: Per-block renames, reference name -> family name, for the parts inside ``stages.{i}.blocks.{j}.``.
_BLOCK_RENAMES = {
    "hub": {
        "norm1": "layer_norm_1", "norm2": "layer_norm_2",
        "attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
        "attn.sr": "attention.self.sr", "attn.sr_norm": "attention.self.layer_norm",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "mlp.dense1", "mlp.dwconv": "mlp.dwconv.dwconv", "mlp.fc2": "mlp.dense2",
    },
    "transformers5": {
        "norm1": "layernorm_before", "norm2": "layernorm_after",
        "attn.q": "attention.q_proj", "attn.k": "attention.k_proj", "attn.v": "attention.v_proj",
        "attn.sr": "attention.sequence_reduction.sequence_reduction",
        "attn.sr_norm": "attention.sequence_reduction.layer_norm", "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1", "mlp.dwconv": "mlp.dwconv.dwconv", "mlp.fc2": "mlp.fc2",
    },
    "official": {
        "norm1": "norm1", "norm2": "norm2",
        "attn.q": "attn.q", "attn.k": "attn.kv", "attn.v": "attn.kv",  # k and v are the two halves of kv
        "attn.sr": "attn.sr", "attn.sr_norm": "attn.norm", "attn.proj": "attn.proj",
        "mlp.fc1": "mlp.fc1", "mlp.dwconv": "mlp.dwconv.dwconv", "mlp.fc2": "mlp.fc2",
    },
}

_HEAD_RENAMES = {
    "hub": {"linear_fuse": "decode_head.linear_fuse", "bn": "decode_head.batch_norm",
            "classifier": "decode_head.classifier"},
    "transformers5": {"linear_fuse": "decode_head.linear_fuse", "bn": "decode_head.batch_norm",
                      "classifier": "decode_head.classifier"},
    "official": {"linear_fuse": "decode_head.linear_fuse.conv", "bn": "decode_head.linear_fuse.bn",
                 "classifier": "decode_head.linear_pred"},
}

_KEY_PATTERN = re.compile(
    r"^(?:stages\.(?P<stage>\d)\.(?:(?P<embed>patch_embed)\.(?P<embed_part>proj|norm)"
    r"|blocks\.(?P<block>\d+)\.(?P<block_part>norm1|norm2|attn\.\w+|mlp\.\w+)|(?P<stage_norm>norm))"
    r"|decode_head\.(?:linear_c\.(?P<linear_c>\d)|(?P<head_part>linear_fuse|bn|classifier)))"
    r"\.(?P<leaf>\w+)$"
)


def family_key(name: str, family: str) -> str:
    """The key of the reference parameter ``name`` in ``family`` (for official k/v: the merged ``kv`` key)."""
    match = _KEY_PATTERN.match(name)
    if match is None:
        raise KeyError(f"not a reference parameter name: {name}")
    groups = match.groupdict()
    leaf = groups["leaf"]
    if groups["linear_c"] is not None:
        index = int(groups["linear_c"])
        return {
            "hub": f"decode_head.linear_c.{index}.proj.{leaf}",
            "transformers5": f"decode_head.linear_projections.{index}.proj.{leaf}",
            "official": f"decode_head.linear_c{index + 1}.proj.{leaf}",
        }[family]
    if groups["head_part"] is not None:
        return f"{_HEAD_RENAMES[family][groups['head_part']]}.{leaf}"
    stage = int(groups["stage"])
    if groups["embed"]:
        part = groups["embed_part"]
        if family == "official":
            return f"backbone.patch_embed{stage + 1}.{part}.{leaf}"
        sub = "proj" if part == "proj" else "layer_norm"
        if family == "hub":
            return f"segformer.encoder.patch_embeddings.{stage}.{sub}.{leaf}"
        return f"segformer.stages.{stage}.patch_embeddings.{sub}.{leaf}"
    if groups["stage_norm"]:
        return {
            "hub": f"segformer.encoder.layer_norm.{stage}.{leaf}",
            "transformers5": f"segformer.stages.{stage}.layer_norm.{leaf}",
            "official": f"backbone.norm{stage + 1}.{leaf}",
        }[family]
    block = int(groups["block"])
    part = _BLOCK_RENAMES[family][groups["block_part"]]
    return {
        "hub": f"segformer.encoder.block.{stage}.{block}.{part}.{leaf}",
        "transformers5": f"segformer.stages.{stage}.blocks.{block}.{part}.{leaf}",
        "official": f"backbone.block{stage + 1}.{block}.{part}.{leaf}",
    }[family]


def to_family(state_dict: dict, family: str) -> dict:
    """Reference-named tensors -> ``family``-named tensors (official: k and v merged into kv)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown key family {family!r}; expected one of {FAMILIES}")
    out = {}
    for name, tensor in state_dict.items():
        key = family_key(name, family)
        if family == "official" and name.endswith(("attn.k.weight", "attn.k.bias")):
            out[key] = torch.cat([tensor, state_dict[name.replace("attn.k.", "attn.v.")]], dim=0)
        elif family == "official" and ".attn.v." in name:
            continue
        else:
            out[key] = tensor
    return out


def detect_family(keys, source: str | None = None) -> str:
    """Which key family a set of checkpoint keys belongs to (``module.`` prefixes ignored); ValueError naming
    ``source`` and the first keys when none matches."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in keys]
    if any(k.startswith(("segformer.encoder.", "encoder.patch_embeddings.", "encoder.block.")) for k in keys):
        return "hub"
    if any(k.startswith(("segformer.stages.", "stages.")) and "patch_embeddings" in k for k in keys):
        return "transformers5"
    if any(k.startswith(("backbone.patch_embed", "patch_embed1.")) for k in keys):
        return "official"
    sample = ", ".join(sorted(keys)[:5]) or "(no keys)"
    raise ValueError(
        (f"{source}: " if source else "")
        + "unrecognized checkpoint keys: expected transformers hub keys (segformer.encoder...), transformers>=5 "
        f"keys (segformer.stages...) or official NVlabs/mmseg keys (backbone.patch_embed1...); first keys: {sample}"
    )


def normalize_prefixes(state_dict: dict, family: str) -> dict:
    """Strip wrappers' prefixes (``module.``) and give backbone-only files the full-model prefix."""
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if family == "official" and re.match(r"^(patch_embed|block|norm)\d", key):
            key = "backbone." + key
        if family == "hub" and key.startswith("encoder."):
            key = "segformer." + key
        if family == "transformers5" and key.startswith("stages."):
            key = "segformer." + key
        out[key] = tensor
    return out


def infer_config(state_dict: dict, family: str, source: str) -> SegformerConfig:
    """Variant, num_labels and eps convention from the tensors of a family-named state dict."""
    dims, depths = [], []
    for stage in range(4):
        proj_key = family_key(f"stages.{stage}.patch_embed.proj.weight", family)
        if proj_key not in state_dict:
            raise ValueError(f"{source}: no patch embedding for stage {stage + 1} (looked for {proj_key!r})")
        dims.append(int(state_dict[proj_key].shape[0]))
        block_prefix = family_key(f"stages.{stage}.blocks.0.norm1.weight", family).rsplit(".0.", 1)[0]
        indices = {
            int(key[len(block_prefix) + 1:].split(".", 1)[0])
            for key in state_dict
            if key.startswith(block_prefix + ".") and key[len(block_prefix) + 1:].split(".", 1)[0].isdigit()
        }
        depths.append(max(indices) + 1 if indices else 0)
    head_key = family_key("decode_head.classifier.weight", family)
    fuse_key = family_key("decode_head.linear_c.0.weight", family)
    decoder_dim = int(state_dict[fuse_key].shape[0]) if fuse_key in state_dict else None
    variant = variant_from_shapes(dims, depths, decoder_dim, source)
    head_bias_key = family_key("decode_head.classifier.bias", family)
    head_tensor = state_dict.get(head_key, state_dict.get(head_bias_key))
    num_labels = int(head_tensor.shape[0]) if head_tensor is not None else 150
    eps_convention = "official" if family == "official" else "transformers"
    return SegformerConfig(variant=variant, num_labels=num_labels, eps_convention=eps_convention)


def from_family(state_dict: dict, family: str, expected: dict, variant: str, source: str) -> dict:
    """Family-named tensors -> reference-named tensors matching ``expected`` (a reference model's state dict of the
    SegFormer ``variant``; its names, shapes and dtypes are what is checked).

    Raises ValueError naming ``source`` and listing missing, unexpected and mis-shaped keys (with shapes).
    Decode-head keys may all be missing (backbone-only files): the caller warns.
    """
    out, used, missing, misshaped, mistyped = {}, set(), [], [], []
    for name, target in expected.items():
        key = family_key(name, family)
        if key not in state_dict:
            if not name.endswith("num_batches_tracked") and key not in missing:
                missing.append(key)
            continue
        tensor = state_dict[key]
        used.add(key)
        if family == "official" and (".attn.k." in name or ".attn.v." in name):
            half = target.shape[0]
            if tensor.shape[0] != 2 * half or tuple(tensor.shape[1:]) != tuple(target.shape[1:]):
                problem = f"{key}: checkpoint {tuple(tensor.shape)}, expected {(2 * half, *target.shape[1:])}"
                if problem not in misshaped:
                    misshaped.append(problem)
                continue
            tensor = tensor[:half] if ".attn.k." in name else tensor[half:]
        if tuple(tensor.shape) != tuple(target.shape):
            misshaped.append(f"{key}: checkpoint {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            continue
        if target.is_floating_point() and not tensor.is_floating_point():
            mistyped.append(f"{key}: checkpoint dtype {tensor.dtype}, expected a floating-point tensor")
            continue
        out[name] = tensor
    ignorable = re.compile(r"^(decode_head\.conv_seg\.|head\.|classifier\.)")
    unexpected = sorted(k for k in state_dict if k not in used and not ignorable.match(k))
    head_missing = [k for k in missing if k.startswith("decode_head.")]
    encoder_missing = [k for k in missing if not k.startswith("decode_head.")]
    head_all_missing = len(head_missing) == sum(
        1 for n in expected if n.startswith("decode_head.") and not n.endswith("num_batches_tracked")
    )
    problems = []
    if encoder_missing or (head_missing and not head_all_missing):
        problems.append(
            f"missing keys ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        )
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20])
            + (" ..." if len(unexpected) > 20 else "")
        )
    if misshaped:
        problems.append(f"mis-shaped keys ({len(misshaped)}): " + "; ".join(misshaped[:20]))
    if mistyped:
        problems.append(f"non-float tensors in float slots ({len(mistyped)}): " + "; ".join(mistyped[:20]))
    if problems:
        raise ValueError(f"{source}: checkpoint does not match a SegFormer-{variant.upper()} "
                         f"({family} keys): " + " | ".join(problems))
    return out
