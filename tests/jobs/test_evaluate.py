"""The eval job (segformer_fast.jobs.evaluate, .datasets) on generated ADE20K and Cityscapes folders: ground truth
scores one, known corruptions, the comparison of two predictors, errors, the JSON report."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from segformer_fast.jobs.datasets import ade20k_dataset, cityscapes_dataset, open_dataset
from segformer_fast.jobs.evaluate import compare, evaluate, write_report
from segformer_fast.render.palettes import CITYSCAPES_CLASSES

from fake_datasets import SIZES, make_ade20k, make_cityscapes, predict_by_size, random_rgb


@pytest.mark.parametrize("split", [True, False])
def test_ade20k_ground_truth_predictor_scores_one(tmp_path, split):
    raws = make_ade20k(tmp_path, split=split)
    dataset = ade20k_dataset(tmp_path)
    assert len(dataset) == 3 and dataset.num_classes == 150 and dataset.reduce_zero_label
    truth = {}
    for sample in dataset:
        label = dataset.load_label(sample)
        assert set(np.unique(label)) == {0, 1, 2, 255}  # 1, 2, 3 -> 0, 1, 2; 0 and 255 -> 255
        # ignored pixels get an arbitrary (wrong) prediction: they must not count
        truth[label.shape] = np.where(label == 255, 5, label)
    result = evaluate(predict_by_size(truth), dataset, 150, progress=False)
    assert result["mIoU"] == 1.0 and result["aAcc"] == 1.0 and result["mAcc"] == 1.0
    total = sum(h * w for h, w in SIZES)
    assert result["counts"]["images"] == 3
    assert result["counts"]["valid_pixels"] == total - 3 * (16 + 6)
    assert result["counts"]["classes_scored"] == 3
    assert [c["name"] for c in result["per_class"][:3]] == ["wall", "building", "sky"]
    assert math.isnan(result["per_class"][3]["IoU"])
    assert raws  # written


def test_ade20k_known_corruption(tmp_path):
    make_ade20k(tmp_path)
    dataset = ade20k_dataset(tmp_path)
    # per image, after reduce_zero_label: class 0 = rows 0-9 minus the 4x4 block, class 1 = rows 10-19,
    # class 2 = rows 20.. minus the 2x3 block
    n0 = sum(10 * w - 16 for h, w in SIZES)
    n1 = sum(10 * w for h, w in SIZES)
    n2 = sum((h - 20) * w - 6 for h, w in SIZES)
    # corruption: in the first image (40x56), class 0 is predicted as class 1 in rows 4-9 (6 * 56 pixels)
    moved = 6 * 56
    truth = {}
    for sample in dataset:
        label = dataset.load_label(sample).astype(np.int64)
        pred = np.where(label == 255, 0, label)
        if label.shape == (40, 56):
            pred[4:10] = 1
        truth[label.shape] = pred
    result = evaluate(predict_by_size(truth), dataset, progress=False)
    iou0 = (n0 - moved) / n0  # union stays n0, intersection loses the moved pixels
    iou1 = n1 / (n1 + moved)  # intersection n1, prediction gains the moved pixels
    assert result["per_class"][0]["IoU"] == pytest.approx(iou0)
    assert result["per_class"][1]["IoU"] == pytest.approx(iou1)
    assert result["per_class"][2]["IoU"] == 1.0
    assert result["mIoU"] == pytest.approx((iou0 + iou1 + 1.0) / 3)
    assert result["aAcc"] == pytest.approx((n0 + n1 + n2 - moved) / (n0 + n1 + n2))
    assert result["mAcc"] == pytest.approx(((n0 - moved) / n0 + 1 + 1) / 3)
    assert result["per_class"][0]["label_pixels"] == n0 and result["per_class"][1]["pred_pixels"] == n1 + moved


def test_compare_reports_both_mious_and_agreement(tmp_path):
    make_ade20k(tmp_path)
    dataset = ade20k_dataset(tmp_path)
    truth, corrupted = {}, {}
    for sample in dataset:
        label = dataset.load_label(sample).astype(np.int64)
        truth[label.shape] = np.where(label == 255, 0, label)
        bad = truth[label.shape].copy()
        if label.shape == (44, 56):
            bad[30:, :] = 0  # rows 30..43 of class 2 predicted as class 0 (the 2x3 ignored block inside)
        corrupted[label.shape] = bad
    valid = sum(h * w - 22 for h, w in SIZES)
    disagree = 14 * 56 - 6
    result = compare(predict_by_size(corrupted), predict_by_size(truth), dataset, progress=False)
    c = result["comparison"]
    assert c["reference_mIoU"] == 1.0 and result["mIoU"] < 1.0 and c["mIoU"] == result["mIoU"]
    assert c["pixel_agreement"] == pytest.approx((valid - disagree) / valid)
    total = sum(h * w for h, w in SIZES)
    assert c["agreement_all_pixels"] == pytest.approx((total - disagree) / total)
    assert c["mIoU_difference"] == pytest.approx(result["mIoU"] - 1.0)


def test_ade20k_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ADE20K folder"):
        ade20k_dataset(tmp_path / "nope")
    (tmp_path / "a" / "images" / "validation").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="annotations"):
        ade20k_dataset(tmp_path / "a")
    (tmp_path / "a" / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ade20k_dataset(tmp_path / "a")
    make_ade20k(tmp_path / "b")
    (tmp_path / "b" / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(ValueError, match="ADE_val_00000001.jpg"):
        ade20k_dataset(tmp_path / "b")
    with pytest.raises(ValueError, match="unknown dataset format"):
        open_dataset("voc", tmp_path / "b")


def test_wrong_predictions_and_sizes_are_reported(tmp_path):
    make_ade20k(tmp_path)
    dataset = open_dataset("ade20k", tmp_path, limit=1)
    assert len(dataset) == 1
    with pytest.raises(ValueError, match="predictor returned shape"):
        evaluate(lambda image: np.zeros((3, 3), np.int64), dataset, progress=False)
    with pytest.raises(ValueError, match="predicts 19 classes but ade20k has 150"):
        evaluate(lambda image: np.zeros((image.height, image.width), np.int64), dataset, 19, progress=False)
    # an annotation whose size differs from its image
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(dataset.samples[0].label)
    with pytest.raises(ValueError, match="annotation size"):
        evaluate(lambda image: np.zeros((image.height, image.width), np.int64), dataset, progress=False)
    with pytest.raises(ValueError, match="limit"):
        dataset.limit(0)


# Cityscapes labelIds with their names, for the 19 evaluated classes (cityscapesScripts labels.py)
CITYSCAPES_EVALUATED = {
    7: "road", 8: "sidewalk", 11: "building", 12: "wall", 13: "fence", 17: "pole", 19: "traffic light",
    20: "traffic sign", 21: "vegetation", 22: "terrain", 23: "sky", 24: "person", 25: "rider", 26: "car",
    27: "truck", 28: "bus", 31: "train", 32: "motorcycle", 33: "bicycle",
}


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    city = "aachen"
    (tmp_path / "leftImg8bit" / "val" / city).mkdir(parents=True)
    (tmp_path / "gtFine" / "val" / city).mkdir(parents=True)
    ids = np.arange(36, dtype=np.uint8).reshape(4, 9)  # every labelId 0..33, plus 34, 35
    ids[3, 8] = 255
    stem = f"{city}_000000_000019"
    random_rgb(4, 9, 0).save(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
    Image.fromarray(ids, "L").save(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
    dataset = cityscapes_dataset(tmp_path)
    train_ids = dataset.load_label(dataset.samples[0])
    for label_id, train_id in zip(ids.ravel(), train_ids.ravel()):
        if label_id in CITYSCAPES_EVALUATED:
            assert CITYSCAPES_CLASSES[train_id] == CITYSCAPES_EVALUATED[label_id], label_id
        else:
            assert train_id == 255, label_id  # unlabeled, void, and classes not evaluated
    assert sorted(train_ids[train_ids != 255].tolist()) == list(range(19))
    # spot checks
    assert train_ids[0, 7] == 0 and train_ids[2, 8] == 13 and train_ids[0, 0] == 255  # road, car (26), unlabeled


def test_cityscapes_dataset_ground_truth_and_corruption(tmp_path):
    truth = make_cityscapes(tmp_path)
    dataset = cityscapes_dataset(tmp_path)
    assert len(dataset) == 3 and dataset.num_classes == 19
    assert [s.image.parent.name for s in dataset] == ["bremen", "bremen", "zurich"]
    for sample in dataset:
        label = dataset.load_label(sample)
        np.testing.assert_array_equal(label, truth[label.shape])
    oracle = {k: np.where(v == 255, 3, v).astype(np.int64) for k, v in truth.items()}
    result = evaluate(predict_by_size(oracle), dataset, 19, progress=False)
    assert result["mIoU"] == 1.0 and result["aAcc"] == 1.0
    assert [c["name"] for c in result["per_class"]] == list(CITYSCAPES_CLASSES)
    # corruption: every "road" (0) pixel predicted as "sidewalk" (1)
    corrupted = {k: np.where(v == 0, 1, v) for k, v in oracle.items()}
    road = sum(int((v == 0).sum()) for v in truth.values())
    sidewalk = sum(int((v == 1).sum()) for v in truth.values())
    valid = sum(int((v != 255).sum()) for v in truth.values())
    result = evaluate(predict_by_size(corrupted), dataset, progress=False)
    assert result["per_class"][0]["IoU"] == 0.0
    assert result["per_class"][1]["IoU"] == pytest.approx(sidewalk / (sidewalk + road))
    assert result["mIoU"] == pytest.approx((17 + sidewalk / (sidewalk + road)) / 19)
    assert result["aAcc"] == pytest.approx((valid - road) / valid)


def test_cityscapes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Cityscapes images folder"):
        cityscapes_dataset(tmp_path)
    make_cityscapes(tmp_path)
    (tmp_path / "gtFine" / "val" / "zurich" / "zurich_000002_000019_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(ValueError, match="zurich_000002_000019_leftImg8bit.png"):
        cityscapes_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------------ report


def test_write_report_turns_nan_into_null(tmp_path):
    make_ade20k(tmp_path / "data")
    dataset = ade20k_dataset(tmp_path / "data")
    result = evaluate(lambda im: np.zeros((im.height, im.width), np.int64), dataset, progress=False)
    path = tmp_path / "report.json"
    write_report(result, path)
    report = json.loads(path.read_text())
    assert report["per_class"][3]["IoU"] is None and report["per_class"][0]["IoU"] > 0
    assert report["dataset"]["format"] == "ade20k" and report["counts"]["images"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "report.json"]  # no temporary left behind
