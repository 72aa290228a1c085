"""mmseg's segmentation metrics: per-class IoU / Acc, mIoU / mAcc / aAcc, and the label mappings they need.

Metrics (mmseg ``intersect_and_union`` / ``mean_iou``): over the whole dataset, per class ``c``::

    intersect[c] = #pixels with pred == label == c          pred_area[c]  = #pixels with pred == c
    label_area[c] = #pixels with label == c                  union[c]      = pred_area[c] + label_area[c] - intersect[c]

counted only where the label is not the ignore index (255), and summed over all images before dividing (so large
images weigh more, as in mmseg). Then ``IoU[c] = intersect / union`` (NaN when the union is empty: the class is in
neither the labels nor the predictions), ``Acc[c] = intersect / label_area`` (NaN when the class is absent from the
labels), ``mIoU`` / ``mAcc`` are the means over the non-NaN classes (numpy ``nanmean``, as mmseg), and ``aAcc`` is
``sum(intersect) / sum(label_area)`` (correct pixels / valid pixels). Values are fractions in [0, 1].
``reduce_zero_label`` (ADE20K) maps label 0 ("other") to 255 and every other label ``l`` to ``l - 1`` (255 stays
255) before counting. Cityscapes labelIds map to the 19 trainIds with the official cityscapesScripts table.
"""

import numpy as np

IGNORE_INDEX = 255

#: Cityscapes labelIds -> trainIds for the 19 evaluated classes (cityscapesScripts ``labels.py``); all other ids,
#: including "unlabeled" (0), the void classes, and the classes not evaluated (parking, rail track, guard rail,
#: bridge, tunnel, polegroup, caravan, trailer, license plate) map to 255.
CITYSCAPES_LABEL_TO_TRAIN_ID = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}


def cityscapes_label_table() -> np.ndarray:
    """(256,) uint8 lookup table: labelId -> trainId (255 for ids that are not evaluated)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> 255, l -> l - 1 for 1 <= l <= 254, 255 stays 255. Returns a new array."""
    label = np.asarray(label)
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


class MetricAccumulator:
    """Per-class intersection / union / prediction area / label area totals over a dataset (mmseg definitions).

    ``update(pred, label)`` adds one image; ``compute()`` gives IoU, Acc, mIoU, mAcc, aAcc. Totals are int64, the
    ratios float64. Predictions must lie in [0, num_classes); labels in [0, num_classes) or ``ignore_index``
    (anything else raises: it means a wrong ``num_classes`` or a label mapping that was not applied).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, reduce_zero_label: bool = False):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.reset()

    def reset(self) -> None:
        k = self.num_classes
        self.area_intersect = np.zeros(k, dtype=np.int64)
        self.area_pred = np.zeros(k, dtype=np.int64)
        self.area_label = np.zeros(k, dtype=np.int64)
        self.num_images = 0
        self.num_pixels = 0
        self.num_ignored = 0

    @property
    def area_union(self) -> np.ndarray:
        return self.area_pred + self.area_label - self.area_intersect

    def update(self, pred, label, name: str | None = None) -> np.ndarray:
        """Add one image: ``pred`` and ``label`` (H, W) integer arrays (numpy or torch). Returns the valid mask."""
        pred = as_numpy(pred)
        label = as_numpy(label)
        where = f" ({name})" if name else ""
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}{where}")
        if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(label.dtype, np.integer)):
            raise ValueError(f"pred and label must be integer arrays, got {pred.dtype} and {label.dtype}{where}")
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        valid = label != self.ignore_index
        pred_valid = pred[valid].astype(np.int64, copy=False)
        label_valid = label[valid].astype(np.int64, copy=False)
        k = self.num_classes
        if label_valid.size:
            lo, hi = int(label_valid.min()), int(label_valid.max())
            if lo < 0 or hi >= k:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"label value {bad} is neither a class in [0, {k}) nor the ignore index {self.ignore_index}{where}"
                )
            lo, hi = int(pred_valid.min()), int(pred_valid.max())
            if lo < 0 or hi >= k:
                bad = lo if lo < 0 else hi
                raise ValueError(f"predicted label {bad} is outside [0, {k}){where}")
        hits = pred_valid[pred_valid == label_valid]
        self.area_intersect += np.bincount(hits, minlength=k)
        self.area_pred += np.bincount(pred_valid, minlength=k)
        self.area_label += np.bincount(label_valid, minlength=k)
        self.num_images += 1
        self.num_pixels += int(label.size)
        self.num_ignored += int(label.size - label_valid.size)
        return valid

    #: The integer totals that :meth:`counts` returns and :meth:`merge` adds (what scale-out workers send back).
    COUNT_FIELDS = ("area_intersect", "area_pred", "area_label", "num_images", "num_pixels", "num_ignored")

    def counts(self) -> dict:
        """The integer totals so far (``COUNT_FIELDS``): per-class arrays as lists, counts as ints (JSON-ready)."""
        return {field: (value.tolist() if isinstance(value, np.ndarray) else int(value))
                for field, value in ((field, getattr(self, field)) for field in self.COUNT_FIELDS)}

    def merge(self, other) -> "MetricAccumulator":
        """Add another accumulator's totals, or a :meth:`counts` dict, to these; the metrics then equal those of
        one accumulator updated with both sets of images. Returns self."""
        counts = other.counts() if isinstance(other, MetricAccumulator) else other
        for field in self.COUNT_FIELDS:
            value = counts[field]
            if isinstance(getattr(self, field), np.ndarray):
                value = np.asarray(value, dtype=np.int64).reshape(-1)
                if value.shape != (self.num_classes,):
                    raise ValueError(f"cannot merge counts of {value.shape[0]} classes into {self.num_classes}")
                setattr(self, field, getattr(self, field) + value)
            else:
                setattr(self, field, getattr(self, field) + int(value))
        return self

    def compute(self) -> dict:
        """Metrics so far: ``mIoU``, ``aAcc``, ``mAcc`` (floats, NaN when undefined), ``IoU`` and ``Acc`` ((K,)
        float64 arrays, NaN for undefined classes), the int64 areas, and the image and pixel counts."""
        intersect = self.area_intersect.astype(np.float64)
        union = self.area_union.astype(np.float64)
        label = self.area_label.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, intersect / union, np.nan)
            acc = np.where(label > 0, intersect / label, np.nan)
        valid = int(self.area_label.sum())
        return {
            "mIoU": _nanmean(iou),
            "aAcc": float(self.area_intersect.sum() / valid) if valid else float("nan"),
            "mAcc": _nanmean(acc),
            "IoU": iou,
            "Acc": acc,
            "area_intersect": self.area_intersect.copy(),
            "area_union": self.area_union,
            "area_pred": self.area_pred.copy(),
            "area_label": self.area_label.copy(),
            "num_images": self.num_images,
            "num_pixels": self.num_pixels,
            "num_valid_pixels": valid,
            "num_ignored_pixels": self.num_ignored,
        }


def as_numpy(array) -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor (on any device) or anything ``np.asarray`` takes."""
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    return np.asarray(array)
