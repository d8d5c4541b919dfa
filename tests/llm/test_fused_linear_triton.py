"""The Triton ``tl.dot`` tiles of ``fused_linear_distill_loss`` (``kdkernels/ops/triton/fused_linear.py``).

With 16 × 16 × 16 tiles and N = 20 positions, V = 80 (student) / 88 (teacher) classes compared
over ``vocab_size = 75``, hidden sizes 40 / 24, every kernel walks several row blocks, vocabulary
tiles and hidden-size chunks with masked edges. Against the float64 materialised formula (logits
``h Wᵀ + b`` then the reference ``distill_loss``, plus a direct cross-entropy): values and the
hidden / weight / bias gradients of the student (and of a teacher that learns) for every
divergence and reduction, masks, soft-cap / scale, the label cross-entropy, float32 / bfloat16 /
mixed heads, the default tile sizes; gradcheck; opcheck and compile; that the tiles (not the
row-block walk) ran; vocabulary-parallel heads (one rank in process, two gloo ranks in
subprocesses); determinism; no (N, V) torch allocation; compilation for sm_90. Runs on CPU under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` without a
GPU), or on a GPU."""

import pytest
import torch
import torch.distributed as dist

import kdkernels
import kdkernels.nn
import kdkernels.ops.triton.fused_linear as tiles
from kdkernels.functional import distill_loss, fused_linear_distill_loss
from kdkernels.llm import fused_linear
from tests.helpers import assert_compiled_matches_eager, reduce_llm_positions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY_NOT = kdkernels.backends.why_unavailable("triton", DEVICE)
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"triton backend on {DEVICE}: {_WHY_NOT}")

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("skew_forward_kl", 0.2),
               ("skew_reverse_kl", 0.1), ("tvd", 0.5)]
SMALL_TILES = (16, 16, 16)


def _heads(seed, n=(2, 10), hs=40, ht=24, vs=80, vt=88, dtype=torch.float64, teacher_grad=False):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, grad=False):
        x = (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)
        return x.requires_grad_(grad)

    # Weights ~ N(0, 4/H): logits of std ~2, so the softmaxes are far from uniform.
    student = [randn(*n, hs, grad=True), randn(vs, hs, scale=2 / hs**0.5, grad=True), randn(vs, grad=True)]
    teacher = [randn(*n, ht, grad=teacher_grad), randn(vt, ht, scale=2 / ht**0.5, grad=teacher_grad),
               randn(vt, grad=teacher_grad)]
    return student, teacher


def _transformed(z, softcap, logit_scale):
    if logit_scale is not None:
        z = z * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _materialised(student, teacher, *, labels=None, kd_weight=1.0, ce_weight=0.0, mask=None, reduction="batchmean",
                  num_items_in_batch=None, softcap=None, logit_scale=None, process_group=None, **kw):
    """float64 logits ``h Wᵀ + b``, the reference divergence per position, a direct label
    cross-entropy over the student's whole vocabulary, then the reduction."""
    z_s, z_t = (torch.nn.functional.linear(*(None if x is None else x.double() for x in head)) for head in (student, teacher))
    with kdkernels.use_backend("torch"):
        per_position = kd_weight * distill_loss(z_s, z_t, labels=labels, mask=mask, reduction="none", softcap=softcap,
                                                logit_scale=logit_scale, **kw)
    counted = torch.ones(z_s.shape[:-1], dtype=torch.bool, device=z_s.device)
    if mask is not None:
        counted &= mask
    if labels is not None:
        counted &= labels != -100
    if ce_weight:
        z = _transformed(z_s, *(x[0] if isinstance(x, tuple) else x for x in (softcap, logit_scale)))
        ce = torch.logsumexp(z, -1) - z.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        per_position = per_position + ce_weight * torch.where(counted, ce, torch.zeros_like(ce))
    return reduce_llm_positions(per_position, counted, reduction, num_items_in_batch)


@pytest.fixture(autouse=True)
def small_tiles():
    """Every test (its backward too: ``reduction="none"`` recomputes there) on 16³ tiles."""
    with tiles.tile_sizes(*SMALL_TILES):
        yield


def _tiled(student, teacher, **kw):
    with kdkernels.use_backend("triton"):
        return fused_linear_distill_loss(*student[:2], *teacher[:2], student[2], teacher[2], **kw)


def _compare(student, teacher, rtol=1e-9, atol=1e-12, **kw):
    """The tiled loss and the gradients of every leaf that requires grad against the
    materialised formula; a random weighting of ``reduction="none"``'s rows."""
    leaves = [x for x in (*student, *teacher) if x is not None and x.requires_grad]
    ours = _tiled(student, teacher, **kw)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(ours)
    ours_grads = torch.autograd.grad((ours * weights).sum(), leaves)
    # + 0·Σx: a constant reference (skew KL at β = 1) still has a graph, its gradients 0.
    expected = _materialised(student, teacher, **kw) + sum(0.0 * x.double().sum() for x in leaves)
    expected_grads = torch.autograd.grad((expected * weights.double()).sum(), leaves)
    torch.testing.assert_close(ours.double(), expected, rtol=rtol, atol=atol)
    for leaf, a, e in zip(leaves, ours_grads, expected_grads):
        name = f"gradient of a {tuple(leaf.shape)} leaf"
        assert a.dtype == leaf.dtype, name
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol * max(1.0, e.abs().max().item()),
                                   msg=lambda m, name=name: f"{name}: {m}")
    return ours


@pytest.fixture
def block_walk_forbidden(monkeypatch):
    """Proves the tiles ran: the row-block walk raises if called."""
    def refuse(*args, **kwargs):
        raise AssertionError("the row-block walk ran instead of the Triton tiles")

    monkeypatch.setattr(fused_linear, "_walk_row_blocks", refuse)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none", "items"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_every_divergence_and_reduction_matches_the_materialised_logits(divergence, beta, reduction, block_walk_forbidden):
    student, teacher = _heads(1)
    mask = torch.rand(2, 10, generator=torch.Generator().manual_seed(2)).to(DEVICE) > 0.3
    kw = dict(divergence=divergence, beta=beta, temperature=1.7, mask=mask, vocab_size=75,
              softcap=(6.0, None), logit_scale=(0.9, 1.2))
    if reduction == "items":
        kw.update(reduction="sum", num_items_in_batch=11)
    else:
        kw.update(reduction=reduction)
    _compare(student, teacher, **kw)


@pytest.mark.parametrize("divergence,beta", [("jsd", 0.0), ("jsd", 1.0), ("skew_forward_kl", 1.0), ("skew_reverse_kl", 1.0)])
def test_beta_endpoints_without_t2_scaling(divergence, beta, block_walk_forbidden):
    student, teacher = _heads(3, vs=40, vt=40)
    _compare(student, teacher, divergence=divergence, beta=beta, temperature=0.8, scale_by_t2=False, softcap=(None, 5.0))


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.4)])
def test_label_cross_entropy_over_the_whole_student_head(divergence, beta, block_walk_forbidden):
    """The divergence over the first 75 classes, the cross-entropy over all 80 of the student's,
    with ignored labels, a label past vocab_size and a mask."""
    student, teacher = _heads(4)
    labels = torch.randint(0, 80, (2, 10), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    labels[0, :3] = -100
    labels[1, 4] = 78
    mask = torch.ones(2, 10, dtype=torch.bool, device=DEVICE)
    mask[1, 7] = False
    _compare(student, teacher, divergence=divergence, beta=beta, temperature=2.0, labels=labels, mask=mask,
             vocab_size=75, kd_weight=0.7, ce_weight=0.4, reduction="mean", softcap=(5.0, None))


def test_cross_entropy_alone(block_walk_forbidden):
    student, teacher = _heads(6, vs=48, vt=48)
    labels = torch.randint(0, 48, (2, 10), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    _compare(student, teacher, labels=labels, kd_weight=0.0, ce_weight=1.0, logit_scale=(1.5, None))


def test_only_some_student_gradients(block_walk_forbidden):
    """No bias, a frozen weight: the hidden-state gradient alone; then the weight's alone."""
    student, teacher = _heads(8)
    student[1].requires_grad_(False)
    _compare([student[0], student[1], None], [teacher[0], teacher[1], None], divergence="tvd", vocab_size=80)
    student[0].requires_grad_(False)
    student[1].requires_grad_(True)
    _compare([student[0], student[1], None], [teacher[0], teacher[1], None], divergence="reverse_kl", vocab_size=80)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_float32_heads(divergence, block_walk_forbidden):
    student, teacher = _heads(9, dtype=torch.float32)
    loss = _compare(student, teacher, rtol=2e-5, atol=2e-6, divergence=divergence, vocab_size=75, temperature=1.5)
    assert loss.dtype == torch.float32


def test_bfloat16_heads(block_walk_forbidden):
    """bf16 operands, fp32 accumulation: close to float64 on the same (rounded) values; each
    gradient in its tensor's dtype."""
    student, teacher = _heads(10, dtype=torch.bfloat16)
    loss = _tiled(student, teacher, divergence="jsd", vocab_size=75)
    grads = torch.autograd.grad(loss, student)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    student64 = [x.detach().double().requires_grad_() for x in student]
    expected = _materialised(student64, [x.detach().double() for x in teacher], divergence="jsd", vocab_size=75)
    expected_grads = torch.autograd.grad(expected, student64)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-3)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a.double(), e, rtol=5e-2, atol=2e-2 * e.abs().max().item())


def test_heads_of_different_dtypes(block_walk_forbidden):
    """A float32 student and a float64 teacher: float64 loss, float32 gradients."""
    student, _ = _heads(18, dtype=torch.float32)
    _, teacher = _heads(19)
    loss = _compare(student, teacher, rtol=2e-5, atol=2e-6, divergence="reverse_kl", vocab_size=75)
    assert loss.dtype == torch.float64


def test_gradcheck_at_a_tiny_size(block_walk_forbidden):
    """Two vocabulary tiles and two hidden chunks; the divergence and the cross-entropy."""
    student, teacher = _heads(11, n=(3,), hs=17, ht=5, vs=20, vt=20)
    labels = torch.tensor([3, -100, 19], device=DEVICE)

    def loss(h, w, b):
        return _tiled([h, w, b], teacher, divergence="skew_reverse_kl", beta=0.3, temperature=1.3,
                      labels=labels, ce_weight=0.5, softcap=(3.0, None))

    assert torch.autograd.gradcheck(loss, tuple(student), fast_mode=True)


def test_deterministic(block_walk_forbidden):
    student, teacher = _heads(12, dtype=torch.float32)
    runs = []
    for _ in range(2):
        loss = _tiled(student, teacher, divergence="jsd", vocab_size=75)
        runs.append([loss, *torch.autograd.grad(loss, student)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES + [("skew_forward_kl", 1.0)])
def test_teacher_gradients(divergence, beta, block_walk_forbidden):
    """A teacher that learns: its hidden-state, weight and bias gradients by the same kernels
    (the teacher's padded rows past vocab_size get 0), with the student's cross-entropy on."""
    student, teacher = _heads(13, teacher_grad=True)
    labels = torch.randint(0, 80, (2, 10), generator=torch.Generator().manual_seed(14)).to(DEVICE)
    labels[1, :2] = -100
    _compare(student, teacher, divergence=divergence, beta=beta, temperature=2.0, vocab_size=75, labels=labels,
             ce_weight=0.3, reduction="mean", softcap=(None, 4.0), logit_scale=(1.1, 0.8))


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("tvd", 0.5)])
def test_process_group_of_one_rank(divergence, beta, block_walk_forbidden, tmp_path):
    """With a process group (one gloo rank: the whole vocabulary) the tiles run with their
    all-reduces (two ranks: tests/llm/_fused_linear_triton_ranks.py)."""
    if DEVICE != "cpu" or not dist.is_available():
        pytest.skip("a one-rank gloo group on CPU")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        student, teacher = _heads(14, vs=40, vt=40, teacher_grad=True)
        labels = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(15))
        _compare(student, teacher, divergence=divergence, beta=beta, temperature=1.5, labels=labels, ce_weight=0.5,
                 reduction="none", process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_tile_sizes_must_suit_tl_dot():
    with pytest.raises(ValueError, match="block_k"):
        with tiles.tile_sizes(16, 16, 8):
            pass
    with pytest.raises(ValueError, match="block_v"):
        with tiles.tile_sizes(16, 48, 16):
            pass


def test_opcheck_of_the_tiles_op():
    """``kdkernels::fused_linear_tiles``: schema, fake (meta) outputs, and no aliasing."""
    student, teacher = _heads(15, n=(12,), vs=40, vt=40)
    hs, ws, bs, ht, wt, bt = (x.detach() for x in (*student, *teacher))
    labels = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(16)).to(DEVICE)
    mask = labels % 3 != 0
    args = (hs, ws, bs, ht, wt, None, mask, labels, "jsd", 0.3, 1.5, True, 5.0, None, None, 1.1, 1.0, 0.5, 33,
            torch.tensor(0.25, dtype=torch.float64, device=DEVICE), [True, True, False, True, False, False])
    torch.library.opcheck(tiles.fused_linear_tiles, args)


def test_compile_fullgraph(block_walk_forbidden):
    student, teacher = _heads(17, dtype=torch.float32)
    module = kdkernels.nn.FusedLinearDistillLoss("jsd", beta=0.3, temperature=2.0, vocab_size=75)
    args = (student[0], student[1], teacher[0], teacher[1], student[2], teacher[2])
    assert_compiled_matches_eager(module, args, student, "triton")


def test_default_tiles(monkeypatch, block_walk_forbidden):
    """The dtype's default tile sizes (not the tests' 16³): float32 32 × 64 × 32, bfloat16
    64 × 64 × 64, each over several row blocks, vocabulary tiles and hidden chunks."""
    monkeypatch.setattr(tiles, "_TILE_OVERRIDE", None)
    assert tiles.default_tile_sizes(torch.float32)[:3] == (32, 64, 32)
    assert tiles.default_tile_sizes(torch.bfloat16)[:3] == (64, 64, 64)
    student, teacher = _heads(20, n=(70,), hs=80, ht=48, vs=300, vt=300, dtype=torch.float32)
    _compare(student, teacher, rtol=2e-5, atol=2e-6, divergence="skew_forward_kl", beta=0.3, temperature=1.5)
    student, teacher = _heads(21, n=(70,), hs=80, ht=48, vs=300, vt=300, dtype=torch.bfloat16)
    loss = _tiled(student, teacher, divergence="forward_kl")
    grads = torch.autograd.grad(loss, student)
    student64 = [x.detach().double().requires_grad_() for x in student]
    expected = _materialised(student64, [x.detach().double() for x in teacher], divergence="forward_kl")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-3)
    for a, e in zip(grads, torch.autograd.grad(expected, student64)):
        torch.testing.assert_close(a.double(), e, rtol=5e-2, atol=2e-2 * e.abs().max().item())


def test_host_side_allocates_nothing_of_n_by_v(monkeypatch, block_walk_forbidden):
    """N = 128, V = 2048, default tiles: one (N, V) fp32 tensor is 1 MiB; the tiles' torch
    allocations are the gradient buffers (0.14 MiB) plus O(N) statistics. (The kernels' own
    tiles are registers on a GPU, a tile's numpy arrays under the interpreter.)"""
    from tests.helpers import peak_extra_bytes

    monkeypatch.setattr(tiles, "_TILE_OVERRIDE", None)
    n, h, v = 128, 16, 2048
    student, teacher = _heads(22, n=(n,), hs=h, ht=h, vs=v, vt=v, dtype=torch.float32)

    def run():
        torch.autograd.grad(_tiled(student, teacher, divergence="jsd"), student)

    run()
    peak = peak_extra_bytes(run)
    gradients = (n * h + v * h + v) * 4
    assert peak < 2 * gradients + 64 * n + (64 << 10), f"peak {peak / 2**20:.2f} MiB"
    assert peak < n * v * 4 / 2


@pytest.mark.gpu
def test_gpu_peak_memory_is_the_gradients():
    """bf16, N = 4096, H = 512, V = 32000 on CUDA: a (N, V) fp32 tensor is 500 MiB; the extra
    memory is the fp32 gradient buffers and the bf16 gradients plus O(N)."""
    if DEVICE != "cuda":
        pytest.skip("needs CUDA")
    n, h, v = 4096, 512, 32000
    student, teacher = _heads(23, n=(n,), hs=h, ht=h, vs=v, vt=v, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with kdkernels.use_backend("triton"), tiles.tile_sizes(*tiles.default_tile_sizes(torch.bfloat16)[:3]):
        loss = fused_linear_distill_loss(*student[:2], *teacher[:2], student[2], teacher[2], divergence="jsd")
        grads = torch.autograd.grad(loss, student)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    gradients = (n * h + v * h + v) * (4 + 2)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert peak < gradients + (16 << 20), f"peak {peak / 2**20:.1f} MiB"


def test_kernels_compile_for_a_gpu():
    """The interpreter accepts code compiled Triton rejects: every kernel (both heads' gradient
    kernels, the closed-form and the per-class statistics, float64 heads) compiled for sm_90 down to the cubin,
    no GPU needed."""
    from tests.test_triton_row_walker import compile_for_sm90, nvidia_backend_installed

    if not nvidia_backend_installed():
        pytest.skip("Triton's NVIDIA backend is not installed")
    result = compile_for_sm90("fused_linear")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok   ") == 8


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    import os
    import subprocess
    import sys

    if DEVICE != "cpu" or not dist.is_available():
        pytest.skip("two gloo ranks on CPU, interpreted")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path_factory.mktemp("fused_linear_triton_ranks")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
           "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29653",
           os.path.join(repo, "tests", "llm", "_fused_linear_triton_ranks.py"), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _two_rank_cases():
    from tests.llm import _fused_linear_triton_ranks as ranks

    return list(ranks.cases())


@pytest.mark.parametrize("name,teacher_learns,kw", _two_rank_cases(), ids=[c[0] for c in _two_rank_cases()])
def test_two_vocab_parallel_ranks_equal_the_whole_heads(two_rank_results, name, teacher_learns, kw):
    """Heads split by rows over 2 ranks: the whole vocabulary's loss on both ranks, each rank's
    weight / bias gradients the whole ones' rows, the hidden states' gradients whole."""
    from tests.llm import _fused_linear_triton_ranks as ranks

    student, teacher, _, _ = ranks.heads()
    student = [x.requires_grad_() for x in student]
    teacher = [x.requires_grad_(teacher_learns) for x in teacher]
    expected = _materialised(student, teacher, **kw)
    weights = torch.linspace(0.5, 1.5, expected.numel(), dtype=expected.dtype).reshape(expected.shape)
    leaves = student + (teacher if teacher_learns else [])
    expected_grads = torch.autograd.grad((expected * weights).sum(), leaves)
    for rank, results in enumerate(two_rank_results):
        loss, grads = results[name]
        rows = slice(0, ranks.SPLIT) if rank == 0 else slice(ranks.SPLIT, None)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-9, atol=1e-12)
        for k, (ours, whole) in enumerate(zip(grads, expected_grads)):
            part = whole if k % 3 == 0 else whole[rows]  # hidden states whole, weights / biases the rank's rows
            torch.testing.assert_close(ours, part, rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"leaf {k}: {m}")
