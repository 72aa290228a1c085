"""mIoU / aAcc / mAcc with mmseg's definitions (segformer_fast.jobs.metrics): known values, absent and ignored
classes, reduce_zero_label, accumulation, bad input."""

import math

import numpy as np
import pytest

from segformer_fast.jobs.metrics import MetricAccumulator, reduce_zero_label

# ------------------------------------------------------------------------------------------------ known metrics


def test_known_ious_on_a_4x4_image():
    label = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, 255, 255],
                      [2, 2, 2, 2]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 1, 1],
                     [2, 0, 3, 3],   # the two 3s fall on ignored pixels: they must not count
                     [2, 2, 2, 0]])
    acc = MetricAccumulator(num_classes=4)
    acc.update(pred, label)
    m = acc.compute()
    # class 0: label 4 px, predicted on 5 valid px, 3 correct -> union 6
    # class 1: label 4, predicted 5, 4 correct -> union 5
    # class 2: label 6, predicted 4, 4 correct -> union 6
    # class 3: only predicted on ignored pixels -> empty union -> NaN, left out of the means
    np.testing.assert_array_equal(m["area_intersect"], [3, 4, 4, 0])
    np.testing.assert_array_equal(m["area_pred"], [5, 5, 4, 0])
    np.testing.assert_array_equal(m["area_label"], [4, 4, 6, 0])
    np.testing.assert_array_equal(m["area_union"], [6, 5, 6, 0])
    np.testing.assert_allclose(m["IoU"][:3], [3 / 6, 4 / 5, 4 / 6])
    assert math.isnan(m["IoU"][3]) and math.isnan(m["Acc"][3])
    np.testing.assert_allclose(m["Acc"][:3], [3 / 4, 4 / 4, 4 / 6])
    assert m["mIoU"] == pytest.approx((3 / 6 + 4 / 5 + 4 / 6) / 3)
    assert m["mAcc"] == pytest.approx((3 / 4 + 1 + 4 / 6) / 3)
    assert m["aAcc"] == pytest.approx(11 / 14)
    assert m["num_valid_pixels"] == 14 and m["num_ignored_pixels"] == 2 and m["num_images"] == 1


def test_class_predicted_but_absent_from_labels_counts_zero_iou():
    label = np.zeros((2, 4), dtype=np.uint8)
    pred = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    acc = MetricAccumulator(3)
    acc.update(pred, label)
    m = acc.compute()
    # class 0: IoU 4/8; class 1: IoU 0 (in the mean), Acc NaN (no label pixels); class 2: NaN everywhere
    assert m["IoU"][0] == 0.5 and m["IoU"][1] == 0.0 and math.isnan(m["IoU"][2])
    assert m["Acc"][0] == 0.5 and math.isnan(m["Acc"][1])
    assert m["mIoU"] == pytest.approx(0.25)
    assert m["mAcc"] == pytest.approx(0.5)
    assert m["aAcc"] == pytest.approx(0.5)


def test_everything_ignored_gives_nan():
    acc = MetricAccumulator(3)
    acc.update(np.zeros((2, 2), np.int64), np.full((2, 2), 255, np.uint8))
    m = acc.compute()
    assert math.isnan(m["mIoU"]) and math.isnan(m["aAcc"]) and math.isnan(m["mAcc"])
    assert m["num_valid_pixels"] == 0 and m["num_ignored_pixels"] == 4


def test_reduce_zero_label():
    raw = np.array([[0, 1, 2], [150, 255, 3]], dtype=np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(raw), [[255, 0, 1], [149, 255, 2]])
    # 0 (other) and 255 are ignored; 1 -> class 0, 2 -> class 1
    label = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    pred = np.array([[1, 0], [0, 1]])
    acc = MetricAccumulator(2, reduce_zero_label=True)
    acc.update(pred, label)
    m = acc.compute()
    # valid pixels: (0,1) label 0 pred 0; (1,0) label 1 pred 0
    np.testing.assert_array_equal(m["area_intersect"], [1, 0])
    np.testing.assert_array_equal(m["area_pred"], [2, 0])
    np.testing.assert_array_equal(m["area_label"], [1, 1])
    np.testing.assert_allclose(m["IoU"], [0.5, 0.0])
    assert m["aAcc"] == 0.5 and m["num_valid_pixels"] == 2


def test_accumulating_images_equals_one_concatenated_image():
    rng = np.random.default_rng(0)
    k = 7
    shapes = [(5, 9), (12, 3), (8, 8), (1, 17)]
    preds = [rng.integers(0, k, s) for s in shapes]
    labels = [np.where(rng.random(s) < 0.2, 255, rng.integers(0, k, s)) for s in shapes]
    separate = MetricAccumulator(k)
    for p, lab in zip(preds, labels):
        separate.update(p, lab)
    joined = MetricAccumulator(k)
    joined.update(np.concatenate([p.ravel() for p in preds])[None],
                  np.concatenate([lab.ravel() for lab in labels])[None])
    a, b = separate.compute(), joined.compute()
    for key in ("area_intersect", "area_union", "area_pred", "area_label"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(a["IoU"], b["IoU"])
    assert a["mIoU"] == b["mIoU"] and a["aAcc"] == b["aAcc"] and a["mAcc"] == b["mAcc"]
    assert a["num_images"] == 4 and b["num_images"] == 1


def test_accumulator_rejects_bad_input():
    acc = MetricAccumulator(3)
    with pytest.raises(ValueError, match="shape"):
        acc.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="label value 7"):
        acc.update(np.zeros((2, 2), int), np.array([[0, 7], [1, 255]]))
    with pytest.raises(ValueError, match="predicted label 3"):
        acc.update(np.array([[0, 3], [1, 1]]), np.zeros((2, 2), int), name="x.jpg")
    with pytest.raises(ValueError, match="integer"):
        acc.update(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="num_classes"):
        MetricAccumulator(0)
    assert acc.compute()["num_images"] == 0


def test_accepts_torch_tensors():
    import torch

    acc = MetricAccumulator(2)
    acc.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]], dtype=torch.uint8))
    assert acc.compute()["IoU"][0] == 0.5
