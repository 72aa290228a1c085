"""mIoU evaluation: metric definitions (mmseg), dataset readers, evaluate/compare, JSON report, the eval command."""

import argparse
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from segformer_fast.cli.evaluate import add_eval_arguments, resize_from_args
from segformer_fast.cli.evaluate import run as cmd_eval
from segformer_fast.jobs.datasets import ade20k_dataset, cityscapes_dataset, open_dataset
from segformer_fast.jobs.evaluate import compare, evaluate, write_report
from segformer_fast.jobs.metrics import CITYSCAPES_LABEL_TO_TRAIN_ID, MetricAccumulator, reduce_zero_label
from segformer_fast.jobs.palettes import ADE20K_CLASSES, CITYSCAPES_CLASSES
from segformer_fast.jobs.predictors import make_predictor

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


# ------------------------------------------------------------------------------------------ generated datasets

# distinct sizes, so that a test predictor can tell the images apart by size alone
SIZES = [(40, 56), (44, 56), (40, 60)]


def _ade_raw_label(h, w):
    """Raw ADE20K labels: rows 0-9 -> 1, 10-19 -> 2, 20.. -> 3; a 4x4 'other' (0) block at the top left; a 2x3
    block of 255 at the bottom right."""
    raw = np.full((h, w), 3, dtype=np.uint8)
    raw[:10] = 1
    raw[10:20] = 2
    raw[:4, :4] = 0
    raw[-2:, -3:] = 255
    return raw


def _random_rgb(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def make_ade20k(root, sizes=SIZES, split=True):
    images = root / "images" / ("validation" if split else "")
    annotations = root / "annotations" / ("validation" if split else "")
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    raws = {}
    for i, (h, w) in enumerate(sizes):
        name = f"ADE_val_{i:08d}"
        _random_rgb(h, w, i).save(images / f"{name}.jpg", quality=90)
        raw = _ade_raw_label(h, w)
        Image.fromarray(raw, "L").save(annotations / f"{name}.png")
        raws[(h, w)] = raw
    return raws


def _by_size(truth):
    """A predictor returning the given label map for each image size."""
    return lambda image: truth[(image.height, image.width)].astype(np.int64)


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
    result = evaluate(_by_size(truth), dataset, 150, progress=False)
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
    result = evaluate(_by_size(truth), dataset, progress=False)
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
    result = compare(_by_size(corrupted), _by_size(truth), dataset, progress=False)
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
    _random_rgb(4, 9, 0).save(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
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


def make_cityscapes(root, sizes=SIZES):
    """Three images in two cities; the last one has only a labelTrainIds file."""
    rng = np.random.default_rng(1)
    inverse = {v: k for k, v in CITYSCAPES_LABEL_TO_TRAIN_ID.items()}
    cities = ["bremen", "bremen", "zurich"]
    truth = {}
    for i, ((h, w), city) in enumerate(zip(sizes, cities)):
        (root / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
        stem = f"{city}_{i:06d}_000019"
        _random_rgb(h, w, i).save(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
        train = rng.integers(0, 19, (h // 4, w // 4)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
        train[:3, :] = 255
        if i < 2:
            ids = np.vectorize(lambda t: inverse.get(int(t), 0))(train).astype(np.uint8)  # 255 -> unlabeled (0)
            Image.fromarray(ids, "L").save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
        else:
            Image.fromarray(train, "L").save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png")
        truth[(h, w)] = train
    return truth


def test_cityscapes_dataset_ground_truth_and_corruption(tmp_path):
    truth = make_cityscapes(tmp_path)
    dataset = cityscapes_dataset(tmp_path)
    assert len(dataset) == 3 and dataset.num_classes == 19
    assert [s.image.parent.name for s in dataset] == ["bremen", "bremen", "zurich"]
    for sample in dataset:
        label = dataset.load_label(sample)
        np.testing.assert_array_equal(label, truth[label.shape])
    oracle = {k: np.where(v == 255, 3, v).astype(np.int64) for k, v in truth.items()}
    result = evaluate(_by_size(oracle), dataset, 19, progress=False)
    assert result["mIoU"] == 1.0 and result["aAcc"] == 1.0
    assert [c["name"] for c in result["per_class"]] == list(CITYSCAPES_CLASSES)
    # corruption: every "road" (0) pixel predicted as "sidewalk" (1)
    corrupted = {k: np.where(v == 0, 1, v) for k, v in oracle.items()}
    road = sum(int((v == 0).sum()) for v in truth.values())
    sidewalk = sum(int((v == 1).sum()) for v in truth.values())
    valid = sum(int((v != 255).sum()) for v in truth.values())
    result = evaluate(_by_size(corrupted), dataset, progress=False)
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


# ------------------------------------------------------------------------------------------------- CLI plumbing


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def test_resize_defaults_and_options():
    base = ["--model", "m", "--data", "d"]
    assert resize_from_args(_parse(base + ["--format", "ade20k"])) == {"short_side": 512, "max_long_side": 2048}
    assert resize_from_args(_parse(base + ["--format", "cityscapes"])) == {"short_side": 1024, "max_long_side": 2048}
    assert resize_from_args(_parse(base + ["--format", "ade20k", "--size", "64", "96"])) == {"size": (64, 96)}
    assert resize_from_args(_parse(base + ["--format", "ade20k", "--short-side", "256"])) == {
        "short_side": 256, "max_long_side": 2048}
    with pytest.raises(ValueError, match="--max-long-side needs --short-side"):
        resize_from_args(_parse(base + ["--format", "ade20k", "--max-long-side", "999"]))
    args = _parse(base + ["--format", "ade20k"])
    assert (args.engine, args.mode, args.device, args.dtype, args.compare, args.out, args.limit) == (
        "fast", "whole", "auto", "fp32", None, None, None)
    with pytest.raises(SystemExit):
        _parse(base + ["--format", "ade20k", "--size", "64", "64", "--short-side", "64"])


@pytest.fixture(scope="module")
def random_b0(tmp_path_factory):
    from segformer_fast import Segformer

    folder = tmp_path_factory.mktemp("b0")
    Segformer.from_config("b0", num_labels=150).save_pretrained(folder)
    return folder


def test_eval_command_end_to_end(tmp_path, random_b0, capsys):
    make_ade20k(tmp_path / "ade")
    out = tmp_path / "r.json"
    args = _parse(["--model", str(random_b0), "--data", str(tmp_path / "ade"), "--format", "ade20k",
                   "--limit", "2", "--size", "64", "64", "--compare", "reference", "--device", "cpu",
                   "--out", str(out), "--quiet"])
    assert cmd_eval(args) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "aAcc" in printed and "mAcc" in printed and "pixel agreement" in printed
    assert re.search(r"mIoU +\d+\.\d+ % over \d+ of 150 classes", printed), printed
    report = json.loads(out.read_text())
    for key in ("mIoU", "aAcc", "mAcc", "per_class", "dataset", "counts", "settings", "comparison"):
        assert key in report, key
    assert report["counts"]["images"] == 2
    assert len(report["per_class"]) == 150 and report["per_class"][0]["name"] == ADE20K_CLASSES[0]
    assert set(report["per_class"][0]) >= {"id", "name", "IoU", "Acc"}
    assert report["settings"]["engine"] == "fast" and report["settings"]["resize"] == {"size": [64, 64]}
    c = report["comparison"]
    assert c["against"] == "reference"
    assert 0.0 <= c["mIoU"] <= 1.0 and 0.0 <= c["reference_mIoU"] <= 1.0
    assert 0.0 <= c["pixel_agreement"] <= 1.0 and c["pixel_agreement"] > 0.99


def test_eval_command_slide_mode(tmp_path, random_b0, capsys):
    make_ade20k(tmp_path / "ade")
    out = tmp_path / "r.json"
    args = _parse(["--model", str(random_b0), "--data", str(tmp_path / "ade"), "--format", "ade20k",
                   "--limit", "1", "--size", "64", "64", "--mode", "slide", "--crop", "48", "48",
                   "--stride", "32", "32", "--engine", "reference", "--device", "cpu", "--out", str(out), "--quiet"])
    assert cmd_eval(args) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["mode"] == "slide"
    assert report["settings"]["crop"] == [48, 48] and report["settings"]["stride"] == [32, 32]
    assert 0.0 <= report["mIoU"] <= 1.0 and report["counts"]["images"] == 1
    assert "crop (48, 48)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--mode slide only"):
        cmd_eval(_parse(["--model", str(random_b0), "--data", str(tmp_path / "ade"), "--format", "ade20k",
                         "--crop", "32", "32"]))


def test_mode_errors_and_class_mismatch(tmp_path, random_b0):
    from segformer_fast.model.segformer import Segformer

    model = Segformer.from_pretrained(random_b0)
    with pytest.raises(ValueError, match="unknown inference mode"):
        make_predictor(model, "reference", "tiles")
    make_cityscapes(tmp_path / "cs")
    args = _parse(["--model", str(random_b0), "--data", str(tmp_path / "cs"), "--format", "cityscapes",
                   "--device", "cpu", "--quiet"])
    with pytest.raises(ValueError, match="150 classes but cityscapes has 19"):
        cmd_eval(args)
