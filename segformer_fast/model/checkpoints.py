"""Checkpoint files: reading every supported format (a hub-layout folder, a weights file, a hub id), writing the
hub layout, and transformers' models as checkpoints. The key names are :mod:`segformer_fast.model.key_families`'.
"""

import contextlib
import json
import os
import re
import struct
from pathlib import Path

import torch

from segformer_fast.core.fileio import atomic_path
from segformer_fast.model.config import SegformerConfig
from segformer_fast.model.key_families import detect_family, family_key, infer_config, normalize_prefixes, to_family

#: What a checkpoint can be, for error messages.
CHECKPOINT_FORMATS = ("expected a .safetensors file, a PyTorch state dict file (.pt, .pth, .bin; a dict of tensors, "
                      "optionally under 'state_dict'), a hub-layout folder or a hub id")


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
        # torch's own message advises weights_only=False, which would run code from the file: not repeated here
        raise ValueError(f"{path}: not a checkpoint: {CHECKPOINT_FORMATS} (reading it as a PyTorch file failed with "
                         f"{type(err).__name__})") from None
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


def is_hub_id(source) -> bool:
    """Whether ``source`` reads as a hub id ("owner/name"), not a relative or absolute path."""
    return bool(_HUB_ID.match(str(source))) and not str(source).startswith((".", "/"))


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
    elif not path.exists() and is_hub_id(source):
        return read_checkpoint(resolve_hub_id(str(source)), num_labels, eps_convention)
    else:
        raise FileNotFoundError(f"checkpoint not found: {source} (not a file, a folder or a hub id)")
    source_name = str(weights_path)
    family = detect_family(raw.keys(), source_name)
    state_dict = normalize_prefixes(raw, family)
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


#: Names of the classifier weight, whose first dimension is the class count, in each checkpoint key family.
_CLASSIFIER_KEYS = ("decode_head.classifier.weight", "decode_head.linear_pred.weight")


def _safetensors_num_labels(path: Path) -> int | None:
    """The class count from a .safetensors file's header (shapes only, no tensor read), or None."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(min(length, 1 << 26)))
    except (OSError, ValueError, struct.error):
        return None
    for key, entry in header.items():
        if isinstance(entry, dict) and key.endswith(_CLASSIFIER_KEYS):
            return int(entry["shape"][0])
    return None


def _checkpoint_path(source) -> Path:
    path = Path(os.fspath(source)).expanduser()
    return resolve_hub_id(str(source)) if not path.exists() and is_hub_id(source) else path


def _config_alone(path: Path) -> SegformerConfig | None:
    """The config of a folder's config.json, or None (no such file, or one read_checkpoint will name a problem in)."""
    config_path = path / "config.json"
    if path.is_dir() and config_path.is_file():
        try:
            return SegformerConfig.from_transformers_dict(json.loads(config_path.read_text()), str(config_path))
        except (ValueError, TypeError, AttributeError):
            return None
    return None


def checkpoint_class_names(source) -> dict:
    """The class names (id -> name) of the checkpoint at ``source``, from its config.json (a folder or a hub id's
    snapshot) without reading its weights; {} where it has none (a weights file alone names no classes)."""
    config = _config_alone(_checkpoint_path(source))
    return dict(config.id2label) if config is not None else {}


def checkpoint_num_labels(source) -> int:
    """How many classes the checkpoint at ``source`` predicts, read from its config.json (a folder or a hub id's
    snapshot) or a .safetensors header, without reading its weights; other files are read whole."""
    path = _checkpoint_path(source)
    config = _config_alone(path)
    if config is not None:
        return config.num_labels
    if path.is_file() and path.suffix == ".safetensors":
        found = _safetensors_num_labels(path)
        if found is not None:
            return found
    return read_checkpoint(path if path.exists() else source)[0].num_labels
