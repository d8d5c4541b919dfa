"""MobileBERT: mean/variance transfer, progressive schedule, pre-training distillation and the
transformers adapter, each against an independent formula (float64) or the model's own outputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdkernels.distill import (
    Distiller,
    FeatureMapTransfer,
    LayerwiseTransferSchedule,
    MeanVarianceTransfer,
    PretrainingDistillation,
    progressive_transfer_losses,
)
from kdkernels.distill.methods.mobilebert_pretraining import pretraining_distillation_loss


def hidden(*shape, scale=1.0, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def ln(x):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-12)


def moments(x):
    mean = x.mean(-1, keepdim=True)
    return mean, ((x - mean) ** 2).mean(-1, keepdim=True)


# --- mean / variance transfer ----------------------------------------------------------------------


def test_mean_variance_transfer_matches_the_formula_in_float64():
    hs = [hidden(2, 5, 8, scale=3, shift=1, seed=i).requires_grad_() for i in range(3)]
    ht = [hidden(2, 5, 8, scale=2, shift=-1, seed=10 + i) for i in range(3)]
    method = MeanVarianceTransfer(["a", "b", "c"], ["d", "e", "f"])
    out = method(hs, ht, None)
    mean = sum(((moments(t)[0] - moments(s)[0]) ** 2).mean() for s, t in zip(hs, ht)) / 3
    var = sum((moments(t)[1] - moments(s)[1]).abs().mean() for s, t in zip(hs, ht)) / 3
    assert out["mean"].dtype == torch.float64
    torch.testing.assert_close(out["mean"], 5000 * mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["variance"], 5 * var, rtol=1e-12, atol=0)
    got = torch.autograd.grad(out["mean"] + out["variance"], hs)
    want = torch.autograd.grad(5000 * mean + 5 * var, hs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(t.grad is None for t in ht)


def test_mean_variance_official_bug_compares_with_every_teacher_layer():
    hs = [hidden(2, 4, 6, seed=i) for i in range(2)]
    ht = [hidden(2, 4, 6, scale=1 + i, shift=i, seed=20 + i) for i in range(3)]  # L + 1 teacher states
    method = MeanVarianceTransfer(["s1", "s2"], ["t0", "t1", "t2"], official_teacher_statistics_bug=True)
    out = method(hs, ht, None)
    stacked = torch.stack(ht)  # (L+1, B, S, H), as tf.reduce_mean(teacher_hiddens, axis=-1) sees it
    t_mean, t_var = moments(stacked)
    mean = sum(((t_mean - moments(s)[0]) ** 2).mean() for s in hs) / 2
    var = sum((t_var - moments(s)[1]).abs().mean() for s in hs) / 2
    torch.testing.assert_close(out["mean"], 5000 * mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["variance"], 5 * var, rtol=1e-12, atol=0)
    correct = MeanVarianceTransfer(["s1", "s2"], ["t1", "t2"])(hs, ht[1:], None)
    assert not torch.allclose(correct["mean"], out["mean"])


def test_mean_variance_flag_must_be_explicit_and_weights_keyword_only():
    with pytest.raises(TypeError, match="official_teacher_statistics_bug: expected True/False"):
        MeanVarianceTransfer("a", "b", official_teacher_statistics_bug=1)
    with pytest.raises(TypeError):
        MeanVarianceTransfer("a", "b", 5000.0)
    with pytest.raises(ValueError, match="mean_variance_transfer: mean_weight"):
        MeanVarianceTransfer("a", "b", mean_weight=-1.0)
    with pytest.raises(ValueError, match="as many student layers as teacher layers"):
        MeanVarianceTransfer(["a", "b"], ["c"])


def test_gates_select_layers_and_divide_by_all_layers():
    hs = [hidden(2, 3, 8, seed=i) for i in range(3)]
    ht = [hidden(2, 3, 8, scale=2, seed=30 + i) for i in range(3)]
    fmt = FeatureMapTransfer(["a", "b", "c"], ["d", "e", "f"])
    fmt.set_layer_gates([0.0, 1.0, 0.0])
    torch.testing.assert_close(fmt(hs, ht, None), ((ln(ht[1]) - ln(hs[1])) ** 2).mean() / 3, rtol=1e-12, atol=0)
    fmt.set_layer_gates([0.0, 0.0, 0.0])
    assert fmt(hs, ht, None) == 0
    with pytest.raises(ValueError, match="feature_map_transfer: layer_gates: expected 3 finite numbers"):
        fmt.set_layer_gates([1.0, 0.0])


def test_feature_map_transfer_keeps_float64():
    s, t = hidden(2, 3, 8, seed=1), hidden(2, 3, 8, seed=2)
    out = FeatureMapTransfer("a", "b")([s], [t], None)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ((ln(t) - ln(s)) ** 2).mean(), rtol=1e-12, atol=0)


def test_progressive_transfer_losses_match_the_formula():
    L = 3
    hs = [hidden(2, 4, 8, seed=i) for i in range(L)]
    ht = [hidden(2, 4, 8, scale=2, seed=40 + i) for i in range(L)]
    ss = [hidden(2, 2, 4, 4, seed=50 + i) for i in range(L)]
    st = [hidden(2, 2, 4, 4, scale=2, seed=60 + i) for i in range(L)]
    gates = [0.0, 0.0, 1.0]
    out = progressive_transfer_losses(hs, ht, ss, st, gates)
    s, t, a_s, a_t = hs[2], ht[2], ss[2], st[2]
    expected = {
        "feature_map": 100 * ((ln(t) - ln(s)) ** 2).mean() / L,
        "attention": 1 * (-(a_t.softmax(-1) * a_s.log_softmax(-1)).sum(-1).mean()) / L,
        "mean": 5000 * ((moments(t)[0] - moments(s)[0]) ** 2).mean() / L,
        "variance": 5 * (moments(t)[1] - moments(s)[1]).abs().mean() / L,
    }
    assert out.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="progressive_transfer_losses: expected L student"):
        progressive_transfer_losses(hs, ht[:2], ss, st, gates)


# --- progressive schedule ------------------------------------------------------------------------


def test_phase_multipliers_follow_the_official_piecewise_constant():
    schedule = LayerwiseTransferSchedule(num_layers=4, total_steps=40)  # P = 10
    P = schedule.steps_per_phase
    assert P == 10
    assert schedule.phase_multipliers(0) == [0.0, 0.0, 0.0, 0.0]
    for layer in range(4):
        start, end = layer * P, (layer + 1) * P
        # tf.train.piecewise_constant: x <= b0 -> 0, b0 < x <= b1 -> 1, x > b1 -> 0.1
        assert schedule.phase_multipliers(start)[layer] == 0.0
        assert schedule.phase_multipliers(start + 1)[layer] == 1.0
        assert schedule.phase_multipliers(end)[layer] == 1.0
        assert schedule.phase_multipliers(end + 1)[layer] == 0.1
        assert schedule.loss_gates(end) == [1.0 if l == layer else 0.0 for l in range(4)]
        assert schedule.phase(end) == layer
    assert schedule.phase_multipliers(25) == [0.1, 0.1, 1.0, 0.0]
    assert schedule.loss_gates(41) == [0.0] * 4


def test_lr_multipliers_are_three_times_the_phase_multipliers_times_the_background():
    flat = LayerwiseTransferSchedule(num_layers=2, total_steps=20, background_warmup=False)
    assert flat.lr_multipliers(15) == [pytest.approx(0.3), 3.0]
    schedule = LayerwiseTransferSchedule(num_layers=2, total_steps=20)
    assert schedule.background(10) == 0.0  # t = s mod P = 0: the periodic warm-up starts at 0
    assert schedule.background(1) == pytest.approx(min(0.1 * math.sqrt(0.9) + 0.9, 1.0))
    assert schedule.background(5) == pytest.approx(0.1 * math.sqrt(0.5) + 0.9)
    assert schedule.lr_multipliers(15) == [pytest.approx(0.3 * schedule.background(15)), pytest.approx(3 * schedule.background(15))]


def test_apply_sets_group_learning_rates_and_method_gates():
    model = torch.nn.ModuleDict({
        "layers": torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]),
        "head": torch.nn.Linear(2, 2),
    })
    schedule = LayerwiseTransferSchedule(num_layers=2, total_steps=20, background_warmup=False)
    groups = schedule.param_groups(model, "layers", lr=1e-3)
    assert [g["layer"] for g in groups] == [0, 1, None]
    optimizer = torch.optim.Adam(groups)
    fmt = FeatureMapTransfer(["a", "b"], ["c", "d"])
    schedule.apply(15, optimizer=optimizer, methods=[fmt])
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(3e-4), pytest.approx(3e-3), 0.0]
    assert fmt.layer_gates == [0.0, 1.0]
    with pytest.raises(ValueError, match="layer_prefix: expected parameters under head.0"):
        schedule.param_groups(model, "head", lr=1e-3)
    with pytest.raises(ValueError, match="must come from param_groups"):
        schedule.apply(3, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_schedule_rejects_bad_configurations():
    with pytest.raises(ValueError, match="LayerwiseTransferSchedule: total_steps: 3 steps cannot give each of the 4 layers a phase"):
        LayerwiseTransferSchedule(num_layers=4, total_steps=3)
    with pytest.raises(ValueError, match="LayerwiseTransferSchedule: num_layers"):
        LayerwiseTransferSchedule(num_layers=0, total_steps=3)
    with pytest.raises(ValueError, match="LayerwiseTransferSchedule: step"):
        LayerwiseTransferSchedule(num_layers=1, total_steps=3).phase_multipliers(-1)


# --- pre-training distillation ----------------------------------------------------------------------


def test_pretraining_distillation_matches_the_mixed_label_ce():
    B, S, V = 2, 5, 7
    zs = hidden(B, S, V, seed=1).requires_grad_()
    zt = hidden(B, S, V, scale=2, seed=2)
    labels = torch.full((B, S), -100)
    labels[0, 1], labels[0, 3], labels[1, 4] = 2, 5, 0
    nsp_s, nsp_y = hidden(B, 2, seed=3), torch.tensor([0, 1])
    out = pretraining_distillation_loss(zs, zt, labels, student_nsp_logits=nsp_s, nsp_labels=nsp_y)
    masked = labels != -100
    q = 0.5 * F.one_hot(labels[masked], V).double() + 0.5 * zt[masked].softmax(-1)
    expected = -(q * zs[masked].log_softmax(-1)).sum() / (masked.sum().double() + 1e-5)
    torch.testing.assert_close(out["mlm"], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["nsp"], F.cross_entropy(nsp_s, nsp_y), rtol=1e-12, atol=0)
    got, = torch.autograd.grad(out["mlm"], zs)
    want, = torch.autograd.grad(expected, zs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert torch.count_nonzero(got[~masked]) == 0


def test_pretraining_distillation_method_reads_target_pairs_and_checks_them():
    zs, zt = hidden(1, 3, 4, seed=1), hidden(1, 3, 4, seed=2)
    labels = torch.tensor([[1, -100, 3]])
    method = PretrainingDistillation("s", "t", "nsp")
    out = method([zs, hidden(1, 2, seed=3)], [zt], (labels, torch.tensor([1])))
    assert set(out) == {"mlm", "nsp"}
    only_ground_truth = PretrainingDistillation("s", "t", ground_truth_ratio=1.0)([zs], [zt], labels)["mlm"]
    torch.testing.assert_close(only_ground_truth, F.cross_entropy(zs[0], labels[0], reduction="sum") / (2 + 1e-5))
    with pytest.raises(ValueError, match="with student_nsp the target must be"):
        method([zs, hidden(1, 2)], [zt], labels)
    with pytest.raises(ValueError, match="ground_truth_ratio: expected a number in \\[0, 1\\]"):
        PretrainingDistillation(ground_truth_ratio=1.5)
    with pytest.raises(ValueError, match="mlm_labels: expected shape \\(1, 3\\)"):
        PretrainingDistillation("s", "t")([zs], [zt], labels[:, :2])
    with pytest.raises(ValueError, match="does not match"):
        PretrainingDistillation("s", "t")([zs], [hidden(1, 3, 5)], labels)


# --- transformers adapter -------------------------------------------------------------------------


def tiny_bert_models():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=16
    )
    mobile = transformers.MobileBertConfig(
        vocab_size=40, hidden_size=16, embedding_size=8, intra_bottleneck_size=8, true_hidden_size=8, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=16, max_position_embeddings=16, num_feedforward_networks=2,
    )
    teacher = transformers.BertForPreTraining._from_config(bert, attn_implementation="eager").eval()
    student = transformers.MobileBertForPreTraining._from_config(mobile, attn_implementation="eager").eval()
    return teacher, student


def test_adapter_captures_hidden_states_and_pre_softmax_scores():
    from kdkernels.distill.adapters import BertFeatures

    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    for model in tiny_bert_models():
        features = BertFeatures(model)
        with features:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        for mine, theirs in zip(features.hidden_states(), out.hidden_states[1:]):
            assert torch.equal(mine, theirs)
        assert torch.equal(features.embedding_output(), out.hidden_states[0])
        scores = features.attention_scores()
        assert len(scores) == 2 and scores[0].shape == (2, 2, 6, 6)
        for mine, probs in zip(scores, out.attentions):
            torch.testing.assert_close(mine.softmax(-1), probs, rtol=1e-6, atol=1e-7)
        assert (scores[0][1, :, :, 4:] < -5000).all()  # the −10⁴ adder on padded keys
        assert torch.equal(features.mlm_logits(), out.prediction_logits)
        features.remove()
        with features:  # no hooks any more: nothing recorded
            model(input_ids=ids)
        with pytest.raises(RuntimeError):
            features.hidden_states()


def test_adapter_paths_drive_the_distiller_with_progressive_gates():
    from kdkernels.distill.adapters import BertFeatures

    teacher, student = tiny_bert_models()
    t_paths = BertFeatures(teacher).hidden_state_paths
    s_paths = BertFeatures(student).hidden_state_paths
    methods = [FeatureMapTransfer(s_paths, t_paths), MeanVarianceTransfer(s_paths, t_paths)]
    distiller = Distiller(student, teacher, methods)
    schedule = LayerwiseTransferSchedule(num_layers=2, total_steps=10)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    schedule.apply(7, methods=methods)  # layer 1's phase
    out = distiller(ids)
    assert set(out.losses) == {"feature_map_transfer", "mean_variance_transfer/mean", "mean_variance_transfer/variance"}
    out.total.backward()
    layer0 = student.mobilebert.encoder.layer[0].output.dense.weight.grad
    layer1 = student.mobilebert.encoder.layer[1].output.dense.weight.grad
    assert layer1.abs().sum() > 0
    assert layer0.abs().sum() > 0  # layer 1's input depends on layer 0: the gate selects losses, not parameters
    t, s = reference_hidden_states(teacher, ids), reference_hidden_states(student, ids)
    expected = 100 * ((ln(t[1].double()) - ln(s[1].double())) ** 2).mean() / 2
    torch.testing.assert_close(out.losses["feature_map_transfer"].double(), expected, rtol=1e-4, atol=1e-7)


def reference_hidden_states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
