"""The torchvision Faster R-CNN adapter. Its tensor-level helpers are checked here on
hand-made tensors laid out as torchvision's RPN / RoIHeads produce them (torchvision's own
formulas from rpn.py ``concat_box_prediction_layers`` / ``compute_loss`` and roi_heads.py
``fastrcnn_loss`` written out below). The end-to-end test on a real torchvision model runs only
where torchvision imports (not on the CPU CI of this repository)."""

import pytest
import torch
import torch.nn.functional as F

from kdkernels.distill.detection.adapters.torchvision_faster_rcnn import (
    FasterRCNNTensors,
    chen_faster_rcnn_losses,
    concat_rpn_predictions,
    roi_boxes_of_labels,
    roi_targets,
    rpn_targets,
)

D = torch.float64


def rpn_outputs(N=2, A=3, sizes=((2, 3), (1, 2))):
    obj = [torch.randn(N, A, h, w, dtype=D) for h, w in sizes]
    deltas = [torch.randn(N, 4 * A, h, w, dtype=D) for h, w in sizes]
    return obj, deltas


def test_rpn_rows_follow_torchvision_order():
    """Rows: image, then level, then y, x, anchor; the deltas' channel of anchor a, coordinate k is 4a + k."""
    obj, deltas = rpn_outputs()
    got_obj, got_deltas = concat_rpn_predictions(obj, deltas)
    want_obj, want_deltas = [], []
    for n in range(2):
        for o, d in zip(obj, deltas):
            _, A, H, W = o.shape
            for y in range(H):
                for x in range(W):
                    for a in range(A):
                        want_obj.append(o[n, a, y, x].item())
                        want_deltas.append([d[n, 4 * a + k, y, x].item() for k in range(4)])
    assert got_obj.tolist() == want_obj
    assert got_deltas.tolist() == want_deltas


def test_rpn_deltas_of_the_wrong_shape_are_rejected():
    obj, deltas = rpn_outputs()
    with pytest.raises(ValueError, match=r"deltas\[1\]"):
        concat_rpn_predictions(obj, [deltas[0], deltas[1][:, :8]])


def test_roi_boxes_pick_the_label_slot():
    reg = torch.arange(3 * 4 * 3, dtype=D).reshape(3, 12)  # 3 classes
    labels = torch.tensor([2, 0, 1])
    assert roi_boxes_of_labels(reg, labels).tolist() == [reg[0, 8:12].tolist(), reg[1, 0:4].tolist(), reg[2, 4:8].tolist()]


def make_tensors():
    """A batch of 2 images as torchvision would hand it over: per-image lists of anchor labels
    (1 / 0 / −1), regression targets, sampler masks; sampled ROIs with labels and targets."""
    torch.manual_seed(0)
    obj, deltas = rpn_outputs()
    s_obj, s_deltas = concat_rpn_predictions(obj, deltas)
    per_image = s_obj.numel() // 2
    labels = [torch.randint(-1, 2, (per_image,)).to(torch.float32) for _ in range(2)]
    regression = [torch.randn(per_image, 4, dtype=D) for _ in range(2)]
    pos = [(lab == 1) & (torch.rand(per_image) < 0.8) for lab in labels]
    neg = [(lab == 0) & (torch.rand(per_image) < 0.6) for lab in labels]
    rpn_t = rpn_targets(labels, regression, pos, neg)
    roi_labels = [torch.tensor([1, 0, 2, 0]), torch.tensor([0, 2, 2])]
    roi_reg_targets = [torch.randn(4, 4, dtype=D), torch.randn(3, 4, dtype=D)]
    roi_t = roi_targets(roi_labels, roi_reg_targets)
    logits, box_reg = torch.randn(7, 3, dtype=D), torch.randn(7, 12, dtype=D)
    t_logits, t_box = torch.randn(7, 3, dtype=D), torch.randn(7, 12, dtype=D)
    feats = torch.randn(2, 4, 3, 3, dtype=D), torch.randn(2, 4, 3, 3, dtype=D)
    tensors = FasterRCNNTensors(
        feats[0], feats[1], s_obj, s_obj + 0.3, s_deltas, s_deltas * 0.9, rpn_t,
        logits, t_logits, roi_boxes_of_labels(box_reg, roi_t.labels), roi_boxes_of_labels(t_box, roi_t.labels), roi_t,
    )
    raw = dict(objectness=s_obj, deltas=s_deltas, labels=labels, regression=regression, pos=pos, neg=neg,
               roi_labels=roi_labels, roi_reg_targets=roi_reg_targets, logits=logits, box_reg=box_reg)
    return tensors, raw


def test_with_teacher_weights_zero_the_losses_are_torchvisions():
    tensors, r = make_tensors()
    losses = chen_faster_rcnn_losses(tensors, mu=1.0, nu=0.0, hint_weight=0.0)
    assert set(losses) == {"rpn/cls_hard", "rpn/reg_smooth_l1", "roi/cls_hard", "roi/reg_smooth_l1"}
    # torchvision RegionProposalNetwork.compute_loss
    sampled_pos = torch.where(torch.cat(r["pos"]))[0]
    sampled_neg = torch.where(torch.cat(r["neg"]))[0]
    sampled = torch.cat([sampled_pos, sampled_neg])
    lab = torch.cat(r["labels"]).to(D)
    reg = torch.cat(r["regression"])
    box_loss = F.smooth_l1_loss(r["deltas"][sampled_pos], reg[sampled_pos], beta=1 / 9, reduction="sum") / sampled.numel()
    obj_loss = F.binary_cross_entropy_with_logits(r["objectness"][sampled], lab[sampled])
    torch.testing.assert_close(losses["rpn/cls_hard"], obj_loss)
    torch.testing.assert_close(losses["rpn/reg_smooth_l1"], box_loss)
    # torchvision roi_heads.fastrcnn_loss
    labels = torch.cat(r["roi_labels"])
    targets = torch.cat(r["roi_reg_targets"])
    pos = torch.where(labels > 0)[0]
    box = r["box_reg"].reshape(7, -1, 4)[pos, labels[pos]]
    torch.testing.assert_close(losses["roi/cls_hard"], F.cross_entropy(r["logits"], labels))
    torch.testing.assert_close(losses["roi/reg_smooth_l1"], F.smooth_l1_loss(box, targets[pos], beta=1 / 9, reduction="sum") / labels.numel())


def test_full_chen_objective_has_every_part():
    tensors, _ = make_tensors()
    conv = torch.nn.Conv2d(4, 4, 1).to(D)
    losses = chen_faster_rcnn_losses(tensors, conv)
    assert set(losses) == {f"{h}/{p}" for h in ("rpn", "roi") for p in ("cls_hard", "cls_soft", "reg_smooth_l1", "reg_bounded")} | {"hint"}
    losses["hint"].backward()
    assert conv.weight.grad.abs().sum() > 0
    assert all(v.dtype == D for v in losses.values())


def test_real_torchvision_faster_rcnn_matches_its_own_losses():
    """Where torchvision imports: with μ = 1, ν = 0, γ = 0 the adapter's losses are the model's."""
    torchvision = pytest.importorskip("torchvision")
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    from kdkernels.distill.detection.adapters.torchvision_faster_rcnn import faster_rcnn_tensors

    def tiny(channels):
        backbone = nn.Sequential(nn.Conv2d(3, channels, 3, stride=4, padding=1), nn.ReLU())
        backbone.out_channels = channels
        return FasterRCNN(
            backbone, num_classes=3, min_size=64, max_size=64,
            rpn_anchor_generator=AnchorGenerator(sizes=((16, 32),), aspect_ratios=((1.0,),)),
            box_roi_pool=torchvision.ops.MultiScaleRoIAlign(featmap_names=["0"], output_size=4, sampling_ratio=2),
        )

    torch.manual_seed(0)
    student, teacher = tiny(8), tiny(16)
    student.train()
    teacher.eval()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 41.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 20.0, 44.0, 43.0], [2.0, 2.0, 20.0, 18.0]]), "labels": torch.tensor([2, 1])}]
    torch.manual_seed(1)
    own = student(images, targets)
    torch.manual_seed(1)
    tensors = faster_rcnn_tensors(student, teacher, images, targets)
    ours = chen_faster_rcnn_losses(tensors, mu=1.0, nu=0.0, hint_weight=0.0)
    torch.testing.assert_close(ours["rpn/cls_hard"], own["loss_objectness"])
    torch.testing.assert_close(ours["rpn/reg_smooth_l1"], own["loss_rpn_box_reg"])
    torch.testing.assert_close(ours["roi/cls_hard"], own["loss_classifier"])
    torch.testing.assert_close(ours["roi/reg_smooth_l1"], own["loss_box_reg"])
