"""Checkpoint loading and saving for every supported format.

Key families (docs/DESIGN.md section 3):

- ``hub``: transformers as published on the hub (``segformer.encoder.block.0.0.attention.self.query.weight``),
- ``transformers5``: transformers >= 5 in memory (``segformer.stages.0.blocks.0.attention.q_proj.weight``),
- ``official``: NVlabs / mmseg-0.x (``backbone.block1.0.attn.q.weight``, merged ``attn.kv``), also
  the ImageNet MiT backbones (``block1.0.attn.q.weight`` without the ``backbone.`` prefix).

Every family is mapped onto the reference model's own parameter names (``stages.0.blocks.0.attn.q.weight``).
"""

import contextlib
import json
import os
import re
from pathlib import Path

import torch

from .config import SegformerConfig, variant_from_shapes
from .fileio import atomic_path

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


def _normalize_prefixes(state_dict: dict, family: str) -> dict:
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


def read_state_dict(path: Path) -> dict:
    """Tensors of one checkpoint file (.safetensors, or a torch pickle loaded with weights_only=True)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(data, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(data.get(wrapper), dict):
                data = data[wrapper]
                break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(
            f"{path}: expected a dict of tensors (optionally under 'state_dict'), got {type(data).__name__}"
        )
    odd_keys = [key for key in data if not isinstance(key, str)]
    if odd_keys:
        raise ValueError(f"{path}: expected tensor names (strings) as keys, got {odd_keys[0]!r} "
                         f"({type(odd_keys[0]).__name__})")
    return dict(data)


def check_finite(state_dict: dict, source: str, family: str | None = None) -> None:
    """ValueError naming ``source`` and the non-finite tensors (by their ``family`` key when given)."""
    bad = []
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            key = family_key(name, family) if family else name
            if key not in bad:  # official k and v share one kv key
                bad.append(key)
    if bad:
        raise ValueError(f"{source}: non-finite values (NaN or Inf) in {len(bad)} tensors: " + ", ".join(bad[:20]))


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _folder_state_dict(folder: Path) -> tuple:
    """(state dict, file name) of a hub-layout folder."""
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_dict(folder / name), folder / name
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            state_dict = {}
            for shard in _index_shards(index_path):
                state_dict.update(read_state_dict(shard))
            return state_dict, index_path
    raise FileNotFoundError(f"{folder}: no weights found; looked for {', '.join(_WEIGHT_FILES)} (or a sharded index)")


def _index_shards(index_path: Path) -> list:
    """The shard files a sharded-checkpoint index names, each checked to lie inside the index's folder.

    ValueError naming the index for invalid JSON, a missing or mistyped ``weight_map``, or a shard path that
    leaves the folder (absolute, ``..``, or a symbolic link pointing outside).
    """
    try:
        index = json.loads(index_path.read_text())
    except ValueError as err:
        raise ValueError(f"{index_path}: not a valid weight index ({err})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: not a valid weight index (expected a non-empty 'weight_map' object)")
    names = set()
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ValueError(f"{index_path}: weight_map[{key!r}] must be a shard file name, got {shard!r}")
        names.add(shard)
    folder = index_path.parent.resolve()
    shards = []
    for name in sorted(names):
        shard = (index_path.parent / name).resolve()
        if not shard.is_relative_to(folder):
            raise ValueError(f"{index_path}: shard {name!r} lies outside the checkpoint folder {folder}; refused")
        shards.append(shard)
    return shards


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot folder of a hub id, through huggingface_hub (its cache first, the hub if reachable)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{repo_id!r} is not a local path and huggingface_hub is not installed") from None
    from huggingface_hub import constants

    # One weights format at a time, preferred first: a repo publishing both (the nvidia SegFormer repos) downloads
    # one, and a cached snapshot holding config.json + model.safetensors is complete offline even when the cached
    # tree listing also names pytorch_model.bin (snapshot_download refuses snapshots missing an allowed file).
    folder, first_error = None, None
    for weights in _WEIGHT_FILES:
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", weights]))
        except Exception as err:
            first_error = first_error or err
            continue
        if (folder / weights).is_file():
            return folder
    if folder is not None:
        return folder  # the caller names what the snapshot lacks
    raise FileNotFoundError(
        f"could not resolve hub id {repo_id!r}: not a local file or folder, and huggingface_hub found no "
        f"snapshot with config.json and model.safetensors or pytorch_model.bin in its cache "
        f"({constants.HF_HUB_CACHE}) nor on the hub ({type(first_error).__name__}: {first_error})"
    ) from None


def read_checkpoint(source, num_labels: int | None = None, eps_convention: str | None = None) -> tuple:
    """Read ``source`` (a hub-layout folder, a weights file, or a hub id): (config, tensors, family, source name).

    ``tensors`` are the checkpoint's tensors with family prefixes normalized (still in the family's key names;
    :func:`from_family` maps them onto the reference's names). Without a config.json, variant, num_labels and eps
    convention are inferred from the tensors and the key family. ``num_labels`` sets the head size of backbone-only
    files; ``eps_convention`` overrides the inferred convention. Raises FileNotFoundError (nothing at ``source``)
    or ValueError (unreadable, malformed). ``Segformer.from_pretrained`` builds the model from these.
    """
    path = Path(os.fspath(source)).expanduser()
    config_dict = None
    if path.is_dir():
        config_path = path / "config.json"
        if config_path.is_file():
            try:
                config_dict = json.loads(config_path.read_text())
            except ValueError as err:
                raise ValueError(f"{config_path}: not valid JSON ({err})") from None
            if not isinstance(config_dict, dict):
                raise ValueError(f"{config_path}: expected a JSON object, got {type(config_dict).__name__}")
        raw, weights_path = _folder_state_dict(path)
    elif path.is_file():
        raw, weights_path = read_state_dict(path), path
    elif not path.exists() and _HUB_ID.match(str(source)) and not str(source).startswith((".", "/")):
        return read_checkpoint(resolve_hub_id(str(source)), num_labels, eps_convention)
    else:
        raise FileNotFoundError(f"checkpoint not found: {source} (not a file, a folder or a hub id)")
    source_name = str(weights_path)
    family = detect_family(raw.keys(), source_name)
    state_dict = _normalize_prefixes(raw, family)
    if config_dict is not None:
        config = SegformerConfig.from_transformers_dict(config_dict, str(path / "config.json"))
    else:
        config = infer_config(state_dict, family, source_name)
    if num_labels is not None and num_labels != config.num_labels:
        config.num_labels = num_labels
        config.id2label = {}  # the names described the other head
    if eps_convention is not None:
        config.eps_convention = eps_convention
    return SegformerConfig(**config.to_dict()), state_dict, family, source_name


def save_pretrained(model, folder) -> None:
    """Write config.json + model.safetensors (hub key names) into ``folder``, creating it if needed.

    Nothing else in the folder is touched. Both files are written completely under hidden temporary names first
    and then renamed over their final names one right after the other, so a failed save leaves the previous files
    (or nothing; a folder it created is removed again), never a half-written one.
    """
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; save_pretrained writes a folder")
    tensors = to_family(
        {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, "hub"
    )
    config = model.config.to_transformers_dict()
    config["dtype"] = str(model.dtype).replace("torch.", "")
    config_text = json.dumps(config, indent=2) + "\n"
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with (atomic_path(folder / "model.safetensors") as weights_tmp,
              atomic_path(folder / "config.json") as config_tmp):
            umask_mode = weights_tmp.stat().st_mode & 0o777  # atomic_path created it with the umask's mode
            save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
            os.chmod(weights_tmp, umask_mode)  # safetensors re-creates the file private (0o600)
            config_tmp.write_text(config_text)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when still empty
        raise


def to_transformers(model):
    """A transformers SegformerForSemanticSegmentation with ``model``'s weights, in eval mode, on its device.

    transformers uses LayerNorm eps 1e-5 everywhere, so a model with the official eps convention cannot be
    represented exactly; this raises ValueError for it rather than returning a model that differs.
    """
    try:
        from transformers import SegformerConfig as HFConfig
        from transformers import SegformerForSemanticSegmentation
    except ImportError:
        raise ImportError("to_transformers needs the transformers package (pip install transformers)") from None
    if model.config.eps_convention != "transformers":
        raise ValueError(
            "this model uses the official LayerNorm eps (1e-6 in blocks); transformers hard-codes 1e-5, so it "
            "cannot reproduce it exactly"
        )
    config_dict = model.config.to_transformers_dict()
    for field in ("architectures", "model_type", "segformer_fast_eps_convention"):
        config_dict.pop(field)
    hf_model = SegformerForSemanticSegmentation(HFConfig(**config_dict))
    family = detect_family(hf_model.state_dict().keys(), "transformers SegformerForSemanticSegmentation")
    tensors = to_family(model.state_dict(), family)
    hf_model.load_state_dict(tensors, strict=True)
    return hf_model.to(device=model.device, dtype=model.dtype).eval()


def is_transformers_segformer(model) -> bool:
    """Whether ``model`` is a transformers ``SegformerForSemanticSegmentation`` (checked by name: transformers is
    optional)."""
    return type(model).__name__ == "SegformerForSemanticSegmentation" and hasattr(model, "segformer")


def transformers_checkpoint(hf_model) -> tuple:
    """(config, tensors, family, source name) of a transformers ``SegformerForSemanticSegmentation``, as
    :func:`read_checkpoint` gives them for a file; the model is read, never modified."""
    source = type(hf_model).__name__
    config = SegformerConfig.from_transformers_dict(hf_model.config.to_dict(), source)
    state = {key: tensor.detach() for key, tensor in hf_model.state_dict().items()}
    return config, state, detect_family(state.keys(), source), source
