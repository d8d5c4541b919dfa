"""examples/detection_kd.py: its --synthetic mode runs end to end in a subprocess (CI), its
dataset is deterministic, and its COCO evaluator gives the numbers of hand-made cases."""

import csv

import pytest
import torch

from tests.script_module import load_script

from .synthetic_run import ROOT, run_synthetic

pytest.importorskip("pycocotools")

EXAMPLE = ROOT / "examples" / "detection_kd.py"


def load_example():
    return load_script(EXAMPLE, "detection_kd_example")


def test_synthetic_run_writes_table_and_plot(tmp_path):
    run_synthetic("detection_kd", "--threads", "1", out=tmp_path, timeout=300)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["teacher", "student none", "student chen", "student chen calibrated", "student ld", "student ld calibrated"]
    assert all(0.0 <= float(r["map"]) <= float(r["map50"]) <= 1.0 for r in rows)
    weights = {r["model"]: r["weight"] for r in rows}
    assert weights["teacher"] == weights["student none"] == ""  # no method, no weight
    assert float(weights["student chen"]) == 1.0 and float(weights["student ld"]) == 1.0  # the published weights
    for name in ("student chen calibrated", "student ld calibrated"):  # set on the first batch: finite, positive, changed
        assert 0.0 < float(weights[name]) < float("inf") and float(weights[name]) != 1.0
    assert (tmp_path / "map.png").stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert "mAP@[.5:.95]" in table and "Δ mAP vs no KD (paired)" in table


def test_paired_differences_against_no_kd():
    example = load_example()
    rows = [{"model": "student none", "seed": 0, "map": 0.30}, {"model": "student none", "seed": 1, "map": 0.20},
            {"model": "student ld", "seed": 1, "map": 0.19}, {"model": "student ld", "seed": 0, "map": 0.35}]
    d = example.paired(rows, "student ld")
    assert d["mean"] == pytest.approx(2.0) and d["sd"] == pytest.approx(6 / 2**0.5)  # diffs +5, −1 (points), by seed
    assert (d["better"], d["worse"]) == (1, 1) and 0.0 < d["p"] <= 1.0


def test_dataset_is_deterministic_and_boxes_are_valid():
    example = load_example()
    a, b = example.make_shapes(6, 64, seed=3), example.make_shapes(6, 64, seed=3)
    assert torch.equal(a.images, b.images) and all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
    for boxes, labels in zip(a.boxes, a.labels):
        assert 1 <= len(boxes) == len(labels) <= 4
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 10 - 1e-4).all() and (boxes >= 0).all() and (boxes <= 64).all()


def test_coco_map_on_hand_made_cases():
    example = load_example()
    gt_boxes, gt_labels = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], [torch.tensor([0])]
    perfect = [{"boxes": gt_boxes[0], "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    assert example.coco_map(perfect, gt_boxes, gt_labels) == pytest.approx({"map": 1.0, "map50": 1.0})
    # IoU 0.62 matches at thresholds 0.50, 0.55, 0.60 of the ten: mAP@[.5:.95] = 3/10
    shifted = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 6.2]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    assert example.coco_map(shifted, gt_boxes, gt_labels) == pytest.approx({"map": 0.3, "map50": 1.0})
    wrong_class = [{"boxes": gt_boxes[0], "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}]
    assert example.coco_map(wrong_class, gt_boxes, gt_labels) == pytest.approx({"map": 0.0, "map50": 0.0})
