"""The offline top-k teacher store: exact round trips, alignment with the student's batch,
resumable writes, and corrupted / truncated shards rejected."""

import json
import os

import pytest
import torch

from kdkernels.llm import CorruptStoreError, TopKTeacherStore, TopKTeacherWriter, write_teacher_topk


def _example(length, k, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(length, vocab, generator=g)
    values, indices = logits.log_softmax(-1).topk(k, dim=-1)
    return indices, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [50, 70_000])
def test_round_trip_is_exact(tmp_path, dtype, vocab):
    k = 4
    examples = [_example(n, k, vocab, seed) for seed, n in enumerate([3, 0, 7, 1, 5])]
    with TopKTeacherWriter(tmp_path, k=k, vocab_size=vocab, value_dtype=dtype, shard_tokens=6) as writer:
        for indices, values in examples:
            writer.append(indices, values)
    store = TopKTeacherStore(tmp_path)
    assert len(store) == 5 and store.num_tokens == 16
    assert len(store._entries) > 1  # several shards were written
    assert store.value_dtype == dtype
    index_bytes = 2 if vocab <= 65536 else 4
    assert store.bytes_per_token == k * (index_bytes + torch.finfo(dtype).bits // 8)
    for i, (indices, values) in enumerate(examples):
        got_indices, got_values = store[i]
        assert torch.equal(got_indices, indices)
        assert got_values.dtype == dtype
        assert torch.equal(got_values, values.to(dtype))


def test_batch_aligns_rows_with_the_student_mask(tmp_path):
    k, vocab = 3, 20
    a, b = _example(2, k, vocab, 0), _example(3, k, vocab, 1)
    with TopKTeacherWriter(tmp_path, k=k, vocab_size=vocab, value_dtype=torch.float32) as writer:
        writer.append(*a)
        writer.append(*b)
    store = TopKTeacherStore(tmp_path)
    mask = torch.tensor([[False, True, False, True], [True, True, True, False]])  # left padding in row 0
    batch = store.batch([0, 1], mask=mask)
    assert batch.indices.shape == (2, 4, k)
    assert torch.equal(batch.indices[0, 1], a[0][0]) and torch.equal(batch.indices[0, 3], a[0][1])
    assert torch.equal(batch.values[1, :3], b[1])
    assert torch.isneginf(batch.values[0, 0]).all() and torch.isneginf(batch.values[1, 3]).all()
    padded = store.batch([1, 0], seq_len=5)
    assert padded.mask.tolist() == [[True] * 3 + [False] * 2, [True] * 2 + [False] * 3]
    with pytest.raises(ValueError, match="mask: row 1 counts 3 positions but example 0 has 2"):
        store.batch([1, 0], mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="seq_len"):
        store.batch([1], seq_len=2)
    with pytest.raises(IndexError, match="example: 2 is out of range"):
        store[2]


def _corrupt(path, how):
    shard = os.path.join(path, "shard-000000.bin")
    if how == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) - 1)
    elif how == "flipped":
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) - 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x01]))
    elif how == "missing":
        os.remove(shard)


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing"])
def test_damaged_shard_is_an_error(tmp_path, how):
    with TopKTeacherWriter(tmp_path, k=2, vocab_size=10, value_dtype=torch.float32) as writer:
        writer.append(*_example(4, 2, 10, 0))
    _corrupt(tmp_path, how)
    store = TopKTeacherStore(tmp_path)  # opening reads only the manifest
    with pytest.raises(CorruptStoreError, match="shard-000000.bin"):
        store[0]
    with pytest.raises(CorruptStoreError):
        store.verify()


def test_damaged_manifest_is_an_error(tmp_path):
    TopKTeacherWriter(tmp_path, k=2, vocab_size=10).close()
    with open(tmp_path / "manifest.json", "w") as f:
        f.write('{"format": "kdkernels-topk-teacher", "vers')
    with pytest.raises(CorruptStoreError, match="not valid JSON"):
        TopKTeacherStore(tmp_path)


class _Teacher(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, vocab)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return {"logits": self.embed(input_ids)}


def _batches(n_batches, batch, seq, vocab):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        lengths = torch.randint(1, seq + 1, (batch,), generator=g)
        mask = torch.arange(seq)[None] < lengths[:, None]
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_write_teacher_topk_stores_log_softmax_topk(tmp_path):
    vocab, k = 30, 5
    teacher = _Teacher(vocab)
    batches = _batches(3, 4, 6, vocab)
    store = write_teacher_topk(teacher, batches, tmp_path, k=k, value_dtype=torch.float32, temperature=2.0, progress=False)
    assert len(store) == 12 and store.temperature == 2.0 and store.vocab_size == vocab
    first = batches[1]
    logprobs = (teacher.embed(first["input_ids"][2]) / 2.0).log_softmax(-1)
    expected_values, expected_indices = logprobs[first["attention_mask"][2]].topk(k, dim=-1)
    indices, values = store[4 + 2]
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(values, expected_values)
    # The student's batch of the same examples reads them back at its own positions.
    aligned = store.batch(range(4, 8), mask=first["attention_mask"])
    assert torch.equal(aligned.mask, first["attention_mask"])


def test_resume_skips_stored_examples_and_continues(tmp_path):
    vocab, k = 30, 3
    batches = _batches(4, 2, 5, vocab)
    teacher = _Teacher(vocab)
    reference = write_teacher_topk(teacher, batches, tmp_path / "full", k=k, progress=False)

    # A run that crashed after three flushed examples and one buffered: only complete shards stay.
    part_dir = tmp_path / "part"
    with pytest.raises(RuntimeError, match="crash"):
        with TopKTeacherWriter(part_dir, k=k, vocab_size=vocab, shard_tokens=1) as writer:
            for example in range(3):
                writer.append(*reference[example])
            writer.shard_tokens = 10**6  # the fourth example stays buffered when the crash comes
            writer.append(*reference[3])
            raise RuntimeError("crash")
    assert len(TopKTeacherStore(part_dir)) == 3
    # A temporary file left by a crash in the middle of a shard write is removed on resume.
    (part_dir / "shard-000003.bin.tmp").write_bytes(b"partial")
    again = _Teacher(vocab)
    again.load_state_dict(teacher.state_dict())
    store = write_teacher_topk(again, batches, part_dir, k=k, progress=False)
    assert not (part_dir / "shard-000003.bin.tmp").exists()
    assert again.calls == 3  # batch 0 skipped; batch 1 still holds example 3
    assert len(store) == len(reference) == 8
    for example in range(8):
        assert torch.equal(store[example][0], reference[example][0])
        assert torch.equal(store[example][1], reference[example][1])


def test_resume_with_other_settings_is_an_error(tmp_path):
    TopKTeacherWriter(tmp_path, k=2, vocab_size=10).close()
    with pytest.raises(ValueError, match="k: the store .* was written with k=2"):
        TopKTeacherWriter(tmp_path, k=3, vocab_size=10)
    with pytest.raises(ValueError, match="value_dtype"):
        TopKTeacherWriter(tmp_path, k=2, vocab_size=10, value_dtype=torch.float16)
    TopKTeacherWriter(tmp_path, k=3, vocab_size=10, overwrite=True).close()
    assert json.loads((tmp_path / "manifest.json").read_text())["k"] == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"k": 0, "vocab_size": 10}, ValueError, "k: expected a positive int", id="k-zero"),
        pytest.param({"k": 11, "vocab_size": 10}, ValueError, "k: 11 is larger than vocab_size", id="k-above-vocab"),
        pytest.param({"k": 2, "vocab_size": 10, "value_dtype": torch.int32}, ValueError, "value_dtype", id="int-values"),
        pytest.param({"k": 2, "vocab_size": 10, "temperature": 0.0}, ValueError, "temperature", id="temperature-zero"),
    ],
)
def test_bad_writer_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        TopKTeacherWriter(tmp_path, **kwargs)


def test_bad_rows_are_rejected(tmp_path):
    writer = TopKTeacherWriter(tmp_path, k=2, vocab_size=10)
    with pytest.raises(ValueError, match=r"indices: ids must lie in \[0, 10\)"):
        writer.append(torch.tensor([[0, 10]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"indices: expected an \(L, 2\) tensor"):
        writer.append(torch.tensor([[0, 1, 2]]), torch.zeros(1, 3))
    with pytest.raises(TypeError, match="indices: expected an integer tensor"):
        writer.append(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="values: expected the shape of indices"):
        writer.append(torch.tensor([[0, 1]]), torch.zeros(2, 2))
