"""SegFormer configuration: the MiT-B0…B5 variants and the LayerNorm eps conventions of the checkpoint sources."""

from dataclasses import asdict, dataclass, field

#: Per variant: (embed dims, depths, decoder dim). Heads, SR ratios and MLP ratio are shared by all variants.
VARIANTS = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3), 768),
}
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
PATCH_SIZES = (7, 3, 3, 3)
STRIDES = (4, 2, 2, 2)

#: LayerNorm eps per norm kind. Official NVlabs / mmseg checkpoints were trained with 1e-6 in the blocks and the
#: stage-final norms and 1e-5 (nn.LayerNorm's default) in the patch-embed and SR norms; transformers uses 1e-5
#: everywhere (its ``layer_norm_eps`` field is not read by the model).
EPS_CONVENTIONS = {
    "transformers": {"patch_embed": 1e-5, "block": 1e-5, "sr": 1e-5, "stage": 1e-5},
    "official": {"patch_embed": 1e-5, "block": 1e-6, "sr": 1e-5, "stage": 1e-6},
}
BATCH_NORM_EPS = 1e-5


@dataclass
class SegformerConfig:
    """Everything that fixes the architecture of a SegFormer (MiT encoder + All-MLP decode head)."""

    variant: str = "b0"
    num_labels: int = 150
    eps_convention: str = "transformers"
    id2label: dict = field(default_factory=dict)

    def __post_init__(self):
        self.variant = self.variant.lower()
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown SegFormer variant {self.variant!r}; expected one of {sorted(VARIANTS)}")
        if self.eps_convention not in EPS_CONVENTIONS:
            raise ValueError(
                f"unknown eps convention {self.eps_convention!r}; expected one of {sorted(EPS_CONVENTIONS)}"
            )
        if not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {self.num_labels!r}")
        self.id2label = {int(k): str(v) for k, v in (self.id2label or {}).items()}

    @property
    def embed_dims(self) -> tuple:
        return VARIANTS[self.variant][0]

    @property
    def depths(self) -> tuple:
        return VARIANTS[self.variant][1]

    @property
    def decoder_dim(self) -> int:
        return VARIANTS[self.variant][2]

    @property
    def num_heads(self) -> tuple:
        return NUM_HEADS

    @property
    def sr_ratios(self) -> tuple:
        return SR_RATIOS

    @property
    def eps(self) -> dict:
        return EPS_CONVENTIONS[self.eps_convention]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_transformers_dict(self) -> dict:
        """The config.json content of the hub layout (fields of transformers' SegformerConfig)."""
        out = {
            "architectures": ["SegformerForSemanticSegmentation"],
            "model_type": "segformer",
            "num_channels": 3,
            "num_encoder_blocks": 4,
            "depths": list(self.depths),
            "hidden_sizes": list(self.embed_dims),
            "decoder_hidden_size": self.decoder_dim,
            "num_attention_heads": list(NUM_HEADS),
            "sr_ratios": list(SR_RATIOS),
            "mlp_ratios": [MLP_RATIO] * 4,
            "patch_sizes": list(PATCH_SIZES),
            "strides": list(STRIDES),
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "classifier_dropout_prob": 0.1,
            "drop_path_rate": 0.1,
            "layer_norm_eps": 1e-6,
            "reshape_last_stage": True,
            "semantic_loss_ignore_index": 255,
            "num_labels": self.num_labels,
            # transformers cannot express the official eps convention; keep it so our loader restores it exactly.
            "segformer_fast_eps_convention": self.eps_convention,
        }
        labels = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        out["id2label"] = {str(k): v for k, v in sorted(labels.items())}
        out["label2id"] = {v: k for k, v in sorted(labels.items())}
        return out

    @classmethod
    def from_transformers_dict(cls, cfg: dict, source: str = "config.json") -> "SegformerConfig":
        """Build from a hub config.json; the variant is matched from hidden_sizes, depths and decoder size.

        Raises ValueError naming ``source`` and the field for a missing, null or mistyped field.
        """
        if not isinstance(cfg, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        for name in ("hidden_sizes", "depths"):
            if name not in cfg:
                raise ValueError(f"{source}: not a SegFormer config (missing {name!r})")
        dims = _int_list(cfg, "hidden_sizes", None, source)
        depths = _int_list(cfg, "depths", None, source)
        decoder = _int_field(cfg, "decoder_hidden_size", 256, source)
        for name, expected in (
            ("num_attention_heads", NUM_HEADS),
            ("sr_ratios", SR_RATIOS),
            ("mlp_ratios", (MLP_RATIO,) * 4),
            ("patch_sizes", PATCH_SIZES),
            ("strides", STRIDES),
        ):
            checks = _int_list(cfg, name, expected, source)
            if checks != tuple(expected):
                raise ValueError(
                    f"{source}: unsupported {name} {list(checks)}; released SegFormers use {list(expected)}"
                )
        variant = variant_from_shapes(dims, depths, decoder, source)
        id2label = cfg.get("id2label") or {}
        if not isinstance(id2label, dict):
            raise ValueError(f"{source}: id2label must be an object of id -> name, got {type(id2label).__name__}")
        labels = {}
        for key, value in id2label.items():
            try:
                label_id = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: id2label keys must be integer class ids, got {key!r}") from None
            if not isinstance(value, str):
                raise ValueError(f"{source}: id2label[{key!r}] must be a string, got {value!r}")
            labels[label_id] = value
        num_labels = _int_field(cfg, "num_labels", len(labels) if labels else 2, source)
        eps_convention = cfg.get("segformer_fast_eps_convention", "transformers")
        if eps_convention not in EPS_CONVENTIONS:
            raise ValueError(f"{source}: segformer_fast_eps_convention must be one of {sorted(EPS_CONVENTIONS)}, "
                             f"got {eps_convention!r}")
        if num_labels < 1:
            raise ValueError(f"{source}: num_labels must be a positive integer, got {num_labels}")
        return cls(variant=variant, num_labels=num_labels, eps_convention=eps_convention, id2label=labels)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(cfg: dict, name: str, default, source: str) -> int:
    """cfg[name] as an int (``default`` when absent or null); ValueError naming the field otherwise."""
    value = cfg.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise ValueError(f"{source}: {name} must be an integer, got {value!r}")
    return value


def _int_list(cfg: dict, name: str, default, source: str) -> tuple:
    """cfg[name] as a tuple of ints (``default`` when absent); ValueError naming the field otherwise."""
    value = cfg.get(name, default)
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        raise ValueError(f"{source}: {name} must be a list of integers, got {value!r}")
    return tuple(value)


def variant_from_shapes(embed_dims, depths, decoder_dim, source: str = "checkpoint") -> str:
    """The variant name whose (embed dims, depths, decoder dim) match; ValueError naming the shapes otherwise."""
    for name, (dims, ds, dec) in VARIANTS.items():
        if tuple(embed_dims) == dims and tuple(depths) == ds and (decoder_dim is None or decoder_dim == dec):
            return name
    raise ValueError(
        f"{source}: embed dims {list(embed_dims)}, depths {list(depths)}, decoder dim {decoder_dim} match no "
        f"SegFormer variant; known: "
        + ", ".join(f"{n}={list(d)}/{list(s)}/{c}" for n, (d, s, c) in VARIANTS.items())
    )
