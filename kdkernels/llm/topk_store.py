"""Offline teacher targets: top-k token ids and log-probabilities in checksummed, memory-mapped shards.

At 128k–262k vocabularies a dense (tokens × V) teacher tensor fits neither on disk nor in memory,
so LLM distillation frameworks (DistillKit, ModelOpt's ``TopLogitsKLLoss``, TRL) keep the teacher's
top-k classes per token and treat the missing tail mass as one extra bucket. This module runs a
teacher over a corpus once and stores exactly that:

* per token: the ids of the k most probable classes and their log-probabilities
  ``log softmax(z / T)`` normalised over the **whole** vocabulary (so the tail mass is
  ``1 − Σ exp(values)``, and a loss can re-temper or renormalise them);
* bytes per token = ``k × (index bytes + value bytes)``: with ``V ≤ 65,536`` ids are ``uint16``
  (2 bytes), otherwise ``int32`` (4); values are ``bfloat16`` / ``float16`` (2) or ``float32`` (4).
  At k = 32 with a 128,256 vocabulary and bf16 values that is 192 bytes per token, against
  256,512 bytes for the dense bf16 logits;
* one record per example (a sequence): the rows of its counted positions (those where the attention
  / label mask was True), in order, so the reader can put them back at the same positions of the
  student's batch.

Layout of a store directory::

    manifest.json          format, k, vocab_size, dtypes, temperature, and per shard: file name,
                           example and token counts, byte size and SHA-256
    shard-000000.bin       [lengths: n_examples × int64][ids: n_tokens × k][values: n_tokens × k]
    ...

Every shard and the manifest are written to a temporary file, flushed to disk and renamed, so a
crash leaves the store at its last complete shard: :class:`TopKTeacherWriter` reopens it and
continues from there (resumable), and :func:`write_teacher_topk` skips the examples already stored.
The reader checks each shard's size and SHA-256 the first time it maps it: a truncated, missing or
corrupted shard raises :class:`CorruptStoreError`, never yields wrong targets.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

FORMAT = "kdkernels-topk-teacher"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Values are stored as raw 2- or 4-byte words; numpy has no bfloat16, so its bits go through uint16.
_VALUE_DTYPES = {
    "float32": (np.float32, torch.float32),
    "float16": (np.float16, torch.float16),
    "bfloat16": (np.uint16, torch.bfloat16),
}
_INDEX_DTYPES = {"uint16": np.uint16, "int32": np.int32}


class CorruptStoreError(ValueError):
    """A store's shard or manifest is missing, truncated or does not match its checksum."""


def _dtype_name(dtype: torch.dtype | str, argument: str) -> str:
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if name not in _VALUE_DTYPES:
        raise ValueError(f"{argument}: expected one of torch.float32, torch.float16, torch.bfloat16, got {dtype!r}")
    return name


def _index_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: str, write: Callable[[Any], None]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_manifest(path: str) -> dict:
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"path: no top-k teacher store at {path!r} ({MANIFEST} not found)") from None
    except json.JSONDecodeError as exc:
        raise CorruptStoreError(f"{manifest_path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CorruptStoreError(
            f"{manifest_path}: not a {FORMAT} v{FORMAT_VERSION} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})"
        )
    return manifest


@dataclass
class TopKBatch:
    """Teacher targets for a batch of examples, aligned with the student's (batch, seq) positions.

    ``indices`` (batch, seq, k) int64 and ``values`` (batch, seq, k) log-probabilities (the store's
    value dtype); ``mask`` (batch, seq) bool is True where a stored row was placed. Positions without
    a row hold index 0 and value −inf (no teacher mass) and are False in ``mask``.
    """

    indices: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TopKBatch":
        return TopKBatch(
            self.indices.to(device, non_blocking=non_blocking),
            self.values.to(device, non_blocking=non_blocking),
            self.mask.to(device, non_blocking=non_blocking),
        )


class _Shard:
    """One verified, memory-mapped shard."""

    def __init__(self, directory: str, entry: Mapping[str, Any], k: int, index_dtype, value_np_dtype) -> None:
        path = os.path.join(directory, entry["file"])
        if not os.path.exists(path):
            raise CorruptStoreError(f"{path}: shard listed in the manifest is missing")
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise CorruptStoreError(f"{path}: {size} bytes on disk, the manifest says {entry['bytes']} (truncated?)")
        if _sha256(path) != entry["sha256"]:
            raise CorruptStoreError(f"{path}: SHA-256 does not match the manifest (corrupted shard)")
        n_examples, n_tokens = entry["examples"], entry["tokens"]
        index_bytes = n_tokens * k * np.dtype(index_dtype).itemsize
        self.lengths = np.memmap(path, dtype=np.int64, mode="r", shape=(n_examples,), offset=0)
        self.offsets = np.concatenate(([0], np.cumsum(self.lengths)))
        start = 8 * n_examples
        self.ids = np.memmap(path, dtype=index_dtype, mode="r", shape=(n_tokens, k), offset=start)
        self.values = np.memmap(path, dtype=value_np_dtype, mode="r", shape=(n_tokens, k), offset=start + index_bytes)
        if int(self.offsets[-1]) != n_tokens:
            raise CorruptStoreError(f"{path}: example lengths sum to {int(self.offsets[-1])}, the manifest says {n_tokens} tokens")


class TopKTeacherStore:
    """Read a store written by :class:`TopKTeacherWriter` / :func:`write_teacher_topk`.

    ``store[i]`` gives example ``i``'s ``(indices (L, k) int64, values (L, k))``;
    :meth:`batch` gives a padded :class:`TopKBatch` for a list of example ids, placed at the
    positions of the student's mask when one is given. Shards are checked (size and SHA-256) the
    first time they are read; :meth:`verify` checks all of them now.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        manifest = _read_manifest(self.path)
        self.k: int = manifest["k"]
        self.vocab_size: int = manifest["vocab_size"]
        self.temperature: float = manifest["temperature"]
        self.value_dtype_name: str = manifest["value_dtype"]
        self.index_dtype_name: str = manifest["index_dtype"]
        self._value_np, self.value_dtype = _VALUE_DTYPES[self.value_dtype_name]
        self._index_np = _INDEX_DTYPES[self.index_dtype_name]
        self._entries: list[dict] = manifest["shards"]
        self._shards: dict[int, _Shard] = {}
        counts = [entry["examples"] for entry in self._entries]
        self._first_example = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self.num_examples = int(self._first_example[-1])
        self.num_tokens = sum(entry["tokens"] for entry in self._entries)

    @property
    def bytes_per_token(self) -> int:
        return self.k * (np.dtype(self._index_np).itemsize + np.dtype(self._value_np).itemsize)

    def __len__(self) -> int:
        return self.num_examples

    def _shard(self, number: int) -> _Shard:
        shard = self._shards.get(number)
        if shard is None:
            shard = _Shard(self.path, self._entries[number], self.k, self._index_np, self._value_np)
            self._shards[number] = shard
        return shard

    def verify(self) -> None:
        """Check every shard's size and checksum now (raises :class:`CorruptStoreError`)."""
        for number in range(len(self._entries)):
            self._shard(number)

    def _rows(self, example: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(example, bool) or not isinstance(example, (int, np.integer)):
            raise TypeError(f"example: expected an int index, got {type(example).__name__}")
        if not 0 <= example < self.num_examples:
            raise IndexError(f"example: {example} is out of range for a store of {self.num_examples} examples")
        number = int(np.searchsorted(self._first_example, example, side="right")) - 1
        shard = self._shard(number)
        local = example - int(self._first_example[number])
        begin, end = int(shard.offsets[local]), int(shard.offsets[local + 1])
        return shard.ids[begin:end], shard.values[begin:end]

    def _to_torch(self, ids: np.ndarray, values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.from_numpy(ids.astype(np.int64))
        values = torch.from_numpy(np.array(values))
        if self.value_dtype == torch.bfloat16:
            values = values.view(torch.bfloat16)
        return indices, values

    def __getitem__(self, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._to_torch(*self._rows(example))

    def batch(
        self,
        examples: Sequence[int],
        mask: torch.Tensor | None = None,
        seq_len: int | None = None,
    ) -> TopKBatch:
        """Targets for ``examples`` as one padded batch.

        Args:
            examples: the examples' ids in the store, in the order of the student's batch.
            mask: optional (batch, seq) bool: the student's counted positions. Example b's stored
                rows go, in order, to the True positions of row b; their number must equal the
                stored length (otherwise the targets would be misaligned: ValueError).
            seq_len: without ``mask``, pad (right) to this length (default: the longest example).
        """
        examples = [int(e) for e in examples]
        rows = [self._rows(e) for e in examples]
        lengths = [len(ids) for ids, _ in rows]
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
                raise ValueError(f"mask: expected a (batch, seq) bool tensor, got {getattr(mask, 'shape', mask)!r}")
            if mask.shape[0] != len(examples):
                raise ValueError(f"mask: has {mask.shape[0]} rows for {len(examples)} examples")
            counted = mask.sum(1).tolist()
            for b, (have, want) in enumerate(zip(lengths, counted)):
                if have != want:
                    raise ValueError(
                        f"mask: row {b} counts {want} positions but example {examples[b]} has {have} stored rows "
                        "(the student's batch does not match the teacher's)"
                    )
            batch_mask = mask.cpu()
        else:
            longest = max(lengths, default=0)
            seq_len = longest if seq_len is None else seq_len
            if seq_len < longest:
                raise ValueError(f"seq_len: {seq_len} is shorter than the longest example ({longest} rows)")
            batch_mask = torch.arange(seq_len)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]
        batch, seq = batch_mask.shape
        indices = torch.zeros(batch, seq, self.k, dtype=torch.long)
        values = torch.full((batch, seq, self.k), float("-inf"), dtype=self.value_dtype)
        for b, (ids, vals) in enumerate(rows):
            if len(ids):
                row_indices, row_values = self._to_torch(ids, vals)
                indices[b, batch_mask[b]] = row_indices
                values[b, batch_mask[b]] = row_values
        return TopKBatch(indices, values, batch_mask)


class TopKTeacherWriter:
    """Append teacher top-k rows to a store, one example (sequence) at a time; resumable.

    Args:
        path: the store's directory (created). If it already holds a store, writing continues after
            its last complete shard, provided ``k``, ``vocab_size``, ``value_dtype`` and
            ``temperature`` match (otherwise ValueError naming the argument); ``overwrite=True``
            starts afresh.
        k: classes kept per token.
        vocab_size: the teacher's vocabulary size (ids must lie in [0, vocab_size)).
        value_dtype: dtype of the stored log-probabilities (bf16 by default: 2 bytes).
        temperature: the T the log-probabilities were computed at (recorded; 1 by default).
        shard_tokens: a shard is written once this many tokens are buffered.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        k: int,
        vocab_size: int,
        value_dtype: torch.dtype | str = torch.bfloat16,
        temperature: float = 1.0,
        shard_tokens: int = 1 << 20,
        overwrite: bool = False,
    ) -> None:
        for name, value in (("k", k), ("vocab_size", vocab_size), ("shard_tokens", shard_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if k > vocab_size:
            raise ValueError(f"k: {k} is larger than vocab_size ({vocab_size})")
        if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        self.path = os.fspath(path)
        self.k, self.vocab_size, self.temperature = k, vocab_size, float(temperature)
        self.value_dtype_name = _dtype_name(value_dtype, "value_dtype")
        self._value_np, self.value_dtype = _VALUE_DTYPES[self.value_dtype_name]
        self.index_dtype_name = _index_dtype_for(vocab_size)
        self._index_np = _INDEX_DTYPES[self.index_dtype_name]
        self.shard_tokens = shard_tokens
        os.makedirs(self.path, exist_ok=True)
        self._shards: list[dict] = []
        if os.path.exists(os.path.join(self.path, MANIFEST)) and not overwrite:
            self._resume(_read_manifest(self.path))
        else:
            for name in os.listdir(self.path):
                if name == MANIFEST or (name.startswith("shard-") and name.endswith((".bin", ".tmp"))):
                    os.remove(os.path.join(self.path, name))
            self._write_manifest()
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_tokens = 0

    def _resume(self, manifest: dict) -> None:
        for name, mine in (
            ("k", self.k),
            ("vocab_size", self.vocab_size),
            ("value_dtype", self.value_dtype_name),
            ("temperature", self.temperature),
        ):
            if manifest[name] != mine:
                raise ValueError(
                    f"{name}: the store at {self.path!r} was written with {name}={manifest[name]!r}, "
                    f"got {mine!r} (pass overwrite=True to start afresh)"
                )
        self._shards = list(manifest["shards"])
        # A shard whose manifest entry never landed is an interrupted write: drop it.
        listed = {entry["file"] for entry in self._shards}
        for name in os.listdir(self.path):
            if name.startswith("shard-") and (name.endswith(".tmp") or name not in listed):
                os.remove(os.path.join(self.path, name))

    @property
    def bytes_per_token(self) -> int:
        return self.k * (np.dtype(self._index_np).itemsize + np.dtype(self._value_np).itemsize)

    @property
    def num_examples(self) -> int:
        """Examples stored or buffered so far (where a resumed run continues)."""
        return sum(entry["examples"] for entry in self._shards) + len(self._pending)

    def append(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Add one example: ``indices`` (L, k) int and ``values`` (L, k) log-probabilities."""
        if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[1] != self.k:
            raise ValueError(f"indices: expected an (L, {self.k}) tensor, got {getattr(indices, 'shape', indices)!r}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"indices: expected an integer tensor, got {indices.dtype}")
        if not isinstance(values, torch.Tensor) or values.shape != indices.shape:
            raise ValueError(f"values: expected the shape of indices {tuple(indices.shape)}, got {getattr(values, 'shape', values)!r}")
        if not values.dtype.is_floating_point:
            raise TypeError(f"values: expected a floating-point tensor, got {values.dtype}")
        ids = indices.detach().cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"indices: ids must lie in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        vals = values.detach().cpu().to(self.value_dtype)
        vals_np = vals.view(torch.uint16).numpy() if self.value_dtype == torch.bfloat16 else vals.numpy()
        self._pending.append((ids.numpy().astype(self._index_np), vals_np.copy()))
        self._pending_tokens += ids.shape[0]
        if self._pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Write the buffered examples as one shard (a no-op when nothing is buffered)."""
        if not self._pending:
            return
        number = len(self._shards)
        name = f"shard-{number:06d}.bin"
        lengths = np.array([len(ids) for ids, _ in self._pending], dtype=np.int64)
        ids = np.concatenate([ids for ids, _ in self._pending]).reshape(-1, self.k)
        values = np.concatenate([vals for _, vals in self._pending]).reshape(-1, self.k)
        path = os.path.join(self.path, name)

        def write(f):
            f.write(lengths.tobytes())
            f.write(np.ascontiguousarray(ids).tobytes())
            f.write(np.ascontiguousarray(values).tobytes())

        _write_atomically(path, write)
        self._shards.append(
            {
                "file": name,
                "examples": int(len(lengths)),
                "tokens": int(lengths.sum()),
                "bytes": os.path.getsize(path),
                "sha256": _sha256(path),
            }
        )
        self._write_manifest()
        self._pending, self._pending_tokens = [], 0

    def _write_manifest(self) -> None:
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "value_dtype": self.value_dtype_name,
            "index_dtype": self.index_dtype_name,
            "temperature": self.temperature,
            "bytes_per_token": self.bytes_per_token,
            "shards": self._shards,
        }
        _write_atomically(os.path.join(self.path, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))

    def close(self) -> TopKTeacherStore:
        """Flush and return a reader of the store."""
        self.flush()
        return TopKTeacherStore(self.path)

    def __enter__(self) -> "TopKTeacherWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception keep only complete shards: what is buffered may be half an epoch of a
        # crashed teacher run, and resuming recomputes it.
        if exc_type is None:
            self.flush()


def _logits_of(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if isinstance(output, Mapping):
        logits = output["logits"]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"teacher: expected (batch, seq, vocab) logits or an output with .logits, got {type(logits).__name__}")
    return logits


@torch.no_grad()
def write_teacher_topk(
    teacher: Callable[..., Any],
    batches: Iterable[Mapping[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    k: int,
    vocab_size: int | None = None,
    value_dtype: torch.dtype | str = torch.bfloat16,
    temperature: float = 1.0,
    mask_key: str = "attention_mask",
    shard_tokens: int = 1 << 20,
    overwrite: bool = False,
    progress: bool = True,
) -> TopKTeacherStore:
    """Run ``teacher`` over ``batches`` once and store its top-k log-probabilities per counted token.

    ``batches`` yields the model's keyword inputs (e.g. ``input_ids``, ``attention_mask``), in a fixed
    order; example ids in the store follow that order. The positions stored for each example are the
    True entries of ``batch[mask_key]`` (all positions when the key is absent), so the student's
    batch of the same examples reads them back with ``store.batch(ids, mask=...)``. When the store
    already holds examples (a resumed run), the batches covering them are skipped without running
    the teacher. Values are ``log_softmax(logits / temperature)`` over the full vocabulary.
    """
    writer: TopKTeacherWriter | None = None
    done = TopKTeacherStore(path).num_examples if (not overwrite and os.path.exists(os.path.join(os.fspath(path), MANIFEST))) else 0
    seen = 0
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="teacher top-k", unit="batch")
    for batch in iterator:
        first = next(iter(batch.values()))
        size = first.shape[0]
        if seen + size <= done:
            seen += size
            continue
        logits = _logits_of(teacher(**batch))
        if writer is None:
            writer = TopKTeacherWriter(
                path,
                k=k,
                vocab_size=vocab_size if vocab_size is not None else logits.shape[-1],
                value_dtype=value_dtype,
                temperature=temperature,
                shard_tokens=shard_tokens,
                overwrite=overwrite,
            )
        logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
        top_values, top_indices = logprobs.topk(k, dim=-1)
        mask = batch.get(mask_key)
        for b in range(max(done - seen, 0), size):
            rows = slice(None) if mask is None else mask[b].bool().to(top_indices.device)
            writer.append(top_indices[b][rows], top_values[b][rows])
        seen += size
    if writer is None:  # nothing new to write (empty input, or everything already stored)
        if not os.path.exists(os.path.join(os.fspath(path), MANIFEST)):
            TopKTeacherWriter(path, k=k, vocab_size=vocab_size or k, value_dtype=value_dtype, temperature=temperature)
        return TopKTeacherStore(path)
    return writer.close()
