"""GFL / ATSS pieces: the assignment and LD's VLR against brute-force loops written from the
official code's rules; the dense head's tensor layout against mmdetection's; a tiny detector
trains one step."""

import math

import pytest
import torch

from kdkernels.distill.detection import atss_assign, vlr_weights
from kdkernels.distill.detection.boxes import check_boxes, pairwise_diou, pairwise_iou
from kdkernels.distill.detection.gfl_detector import CompactGFL, LevelConcat

D = torch.float64


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def diou(a, b):
    ca = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2)
    cb = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    return iou(a, b) - ((ca[0] - cb[0]) ** 2 + (ca[1] - cb[1]) ** 2) / (cw * cw + ch * ch)


def threshold(anchors, levels, g, k=9):
    """mean + unbiased std of the IoUs of the k closest anchors (centre distance) per level."""
    cands, start = [], 0
    gc = ((g[0] + g[2]) / 2, (g[1] + g[3]) / 2)
    for n in levels:
        d = [(math.dist(((a[0] + a[2]) / 2, (a[1] + a[3]) / 2), gc), start + i) for i, a in enumerate(anchors[start : start + n])]
        cands += [i for _, i in sorted(d)[: min(k, n)]]
        start += n
    ious = [iou(anchors[i], g) for i in cands]
    mean = sum(ious) / len(ious)
    std = math.sqrt(sum((v - mean) ** 2 for v in ious) / (len(ious) - 1))
    return cands, mean + std


def grid_anchors():
    model = CompactGFL(3, width=8, channels=16, stacked_convs=1)
    anchors, _, counts = model.anchors((64, 64))
    return anchors.to(D), counts


GT = torch.tensor([[4.0, 6.0, 30.0, 41.0], [33.0, 28.0, 61.0, 62.0], [20.0, 20.0, 34.0, 33.0]], dtype=D)


def test_pairwise_iou_and_diou_match_loops():
    a = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 25]], dtype=D)
    got_iou, got_diou = pairwise_iou(a, GT), pairwise_diou(a, GT)
    for i in range(2):
        for j in range(3):
            assert got_iou[i, j].item() == pytest.approx(iou(a[i].tolist(), GT[j].tolist()), abs=1e-12)
            assert got_diou[i, j].item() == pytest.approx(diou(a[i].tolist(), GT[j].tolist()), abs=1e-12)


def test_atss_assignment_matches_loops():
    anchors, counts = grid_anchors()
    A, G = anchors.tolist(), GT.tolist()
    want = [-1] * len(A)
    best = [-math.inf] * len(A)
    for j, g in enumerate(G):
        cands, thr = threshold(A, counts, g)
        for i in cands:
            a = A[i]
            cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
            inside = min(cx - g[0], cy - g[1], g[2] - cx, g[3] - cy) > 0.01
            v = iou(a, g)
            if v >= thr and inside and v > best[i]:
                best[i], want[i] = v, j
    assigned, _ = atss_assign(anchors, counts, GT)
    assert assigned.tolist() == want
    assert (assigned >= 0).sum() >= 3  # each box got positives: the test is not vacuous


def test_vlr_weights_match_official_rule():
    """HikariTJU/LD get_vlr_region: all anchors, 0.25·thr ≤ DIoU < thr, weight = plain IoU of the best box."""
    anchors, counts = grid_anchors()
    A, G = anchors.tolist(), GT.tolist()
    thr = [threshold(A, counts, g)[1] for g in G]
    want = []
    for a in A:
        vals = [iou(a, g) for j, g in enumerate(G) if 0.25 * thr[j] <= diou(a, g) < thr[j]]
        want.append(max(vals) if vals else 0.0)
    got = vlr_weights(anchors, counts, GT)
    torch.testing.assert_close(got, torch.tensor(want, dtype=D))
    assert (got > 0).sum() > 3


def test_level_concat_matches_mmdetection_layout():
    """mmdet's loss_single flattens each level with permute(0, 2, 3, 1).reshape(-1, C) (image,
    y, x); the concatenation over levels keeps, per image, level after level."""
    maps = [torch.arange(2 * 3 * 2 * 2, dtype=D).reshape(2, 3, 2, 2), 100 + torch.arange(2 * 3 * 1 * 1, dtype=D).reshape(2, 3, 1, 1)]
    got = LevelConcat()(maps)
    assert got.shape == (2, 5, 3)
    for b in range(2):
        rows = [maps[0][b, :, y, x].tolist() for y in range(2) for x in range(2)] + [maps[1][b, :, 0, 0].tolist()]
        assert got[b].tolist() == rows


def test_anchors_centres_and_counts():
    model = CompactGFL(3, width=8, channels=16, stacked_convs=1, anchor_scale=4.0)
    anchors, strides, counts = model.anchors((64, 64))
    assert counts == [64, 16, 4]
    assert anchors[0].tolist() == [4 - 16, 4 - 16, 4 + 16, 4 + 16]  # centre (0.5·8, 0.5·8), side 4·8
    assert anchors[64 + 1].tolist() == [24 - 32, 8 - 32, 24 + 32, 8 + 32]  # level 2, x = 1: centre (1.5·16, 0.5·16)
    assert strides[63].item() == 8 and strides[64].item() == 16


def test_boxes_in_the_wrong_format_are_rejected():
    xywh = torch.tensor([[20.0, 20.0, 10.0, 8.0]])  # (x, y, w, h): x2 < x1
    anchors, counts = grid_anchors()
    with pytest.raises(ValueError, match="gt_boxes.*x2 >= x1"):
        atss_assign(anchors, counts, xywh.to(D))
    with pytest.raises(ValueError, match=r"gt_boxes.*\(\.\.\., 4\)"):
        check_boxes(torch.zeros(3, 5), "gt_boxes")


def test_tiny_detector_trains_one_step():
    torch.manual_seed(0)
    model = CompactGFL(3, width=8, channels=16, stacked_convs=1)
    x = torch.rand(2, 3, 64, 64)
    targets = model.assign([GT.float(), GT[:1].float()], [torch.tensor([0, 1, 2]), torch.tensor([1])], (64, 64))
    losses = model.loss(model(x), targets, (64, 64))
    assert set(losses) == {"qfl", "giou", "dfl"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.box_logits.weight.grad.abs().sum() > 0 and model.backbone.stem[0][0].weight.grad.abs().sum() > 0
    preds = model.predict(x, score_threshold=0.0)
    assert len(preds) == 2 and preds[0]["boxes"].shape[1] == 4


def test_assign_gives_official_dfl_targets():
    """GFLHead: target_corners = bbox2distance(anchor_centre / stride, gt / stride, reg_max)
    clamped to [0, reg_max − 0.1]; labels: the box's class on positives, num_classes elsewhere."""
    model = CompactGFL(3, width=8, channels=16, stacked_convs=1)
    gt = torch.tensor([[4.0, 6.0, 30.0, 41.0], [2.0, 2.0, 62.0, 62.0]])
    targets = model.assign([gt], [torch.tensor([2, 1])], (64, 64))
    anchors, strides, _ = model.anchors((64, 64))
    pos = targets.positive[0].nonzero().squeeze(1).tolist()
    assert pos and targets.labels[0][~targets.positive[0]].eq(3).all()
    for i in pos:
        box = targets.gt_boxes[0, i].tolist()
        s = strides[i].item()
        cx, cy = (anchors[i, 0] + anchors[i, 2]).item() / 2 / s, (anchors[i, 1] + anchors[i, 3]).item() / 2 / s
        want = [cx - box[0] / s, cy - box[1] / s, box[2] / s - cx, box[3] / s - cy]
        want = [min(max(v, 0.0), 16 - 0.1) for v in want]
        assert targets.box_targets[0, i].tolist() == pytest.approx(want, abs=1e-5)
        assert targets.labels[0, i].item() == (2 if box == gt[0].tolist() else 1)
