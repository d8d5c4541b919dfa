"""Distil a small Llama-style causal LM into a smaller one, offline, on CPU.

* Corpus: the Python standard library's own sources (code, comments and docstrings), read from
  the running interpreter's ``stdlib`` directory; files split into train / validation by name.
* Tokenizer: byte-level BPE trained here with ``tokenizers`` on the training files.
* Teacher: a ``transformers`` ``LlamaForCausalLM`` built from a config, trained on the labels for a
  fixed time budget; then the student (smaller config, same tokenizer) is trained for a fixed
  number of steps, each run from the same initialisation and batches:
    - ``labels only`` (cross-entropy),
    - ``dense KD`` with every divergence of :func:`kdkernels.llm.distill_loss`
      (loss = ½ CE + ½ divergence at T = 1; the teacher runs online),
    - from a top-k store written once by :func:`kdkernels.llm.write_teacher_topk` (k = 8, 32,
      ``tail_bucket`` and ``renormalize``). k = full vocabulary is the dense run (the tests show a
      store with k = V gives the dense loss exactly); it is not stored again here because at k = V a
      store costs V × 4 bytes per token.
    - ``fused-linear forward_kl``: the dense forward-KL run again without logits: both models run
      without their LM heads and :func:`kdkernels.llm.hf.causal_lm_fused_linear_distill_loss`
      takes their final hidden states and head weights (divergence and CE in row blocks).
* One training step (student forward, teacher forward, loss, backward), dense logits vs
  fused-linear: peak extra memory (CPU allocator, torch profiler) and median time, at the
  example's vocabulary and at ``--compare-vocab`` (fresh models of the same sizes).
* Output (``--out``): ``results.csv`` / ``results.md`` (validation perplexity of each run, store bytes
  per token; the step comparison), ``step_comparison.csv`` and ``perplexity.png``.

The losses run through kdkernels' fused kernels: :func:`kdkernels.llm.distill_loss` dispatches a
dense teacher to the ``kdkernels::divergences`` op and a top-k one to ``sparse_divergences`` (CPU
C++ kernels here; Triton on a GPU), the fused-linear loss calls the same divergence kernel per
block.

    python examples/llm_distill.py                 # default: minutes on 2 cores
    python examples/llm_distill.py --synthetic     # seconds (CI)
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import sys
import sysconfig
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", action="store_true", help="tiny corpus, models and step counts (seconds)")
    p.add_argument("--out", default="examples/out/llm_distill")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher-minutes", type=float, default=3.0)
    p.add_argument("--student-steps", type=int, default=100)
    p.add_argument("--max-files", type=int, default=120, help="stdlib files read (sorted by name)")
    p.add_argument("--val-seqs", type=int, default=64)
    p.add_argument("--student-seqs", type=int, default=1600,
                   help="the students train on (and the stores cover) the first N training sequences")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-vocab", type=int, default=32000, help="the larger vocabulary of the dense vs fused-linear step")
    p.add_argument("--compare-repeats", type=int, default=3, help="timed steps per mode (median)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.synthetic:
        args.vocab, args.seq_len, args.batch = 300, 32, 8
        args.teacher_minutes, args.student_steps, args.max_files, args.val_seqs = 0.0, 4, 6, 8
        args.student_seqs = 64
        args.compare_vocab, args.compare_repeats = 2000, 1
    return args


def read_corpus(max_files: int) -> tuple[list[str], list[str]]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:max_files]
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    # every 10th file goes to validation: unseen modules, same style
    train = [t for i, t in enumerate(texts) if i % 10 != 9]
    val = [t for i, t in enumerate(texts) if i % 10 == 9] or texts[-1:]
    return train, val


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def to_sequences(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    ids = [i for text in texts for i in tokenizer.encode(text).ids]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def llama(vocab: int, hidden: int, layers: int, heads: int, seq_len: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq_len, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def perplexity(model, val: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val), batch):
        ids = val[i : i + batch]
        logits = model(input_ids=ids).logits[:, :-1]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train()
    return math.exp(total / max(count, 1))


def batches(train: torch.Tensor, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(train), generator=g)])
        picked, order = order[:batch], order[batch:]
        yield picked


def train_teacher(args, train, val):
    from tqdm.auto import tqdm

    size = (48, 1, 2) if args.synthetic else (256, 4, 4)
    teacher = llama(args.vocab, *size, args.seq_len, args.seed + 1)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3, weight_decay=0.01)
    deadline = time.time() + args.teacher_minutes * 60
    steps = 0
    bar = tqdm(desc="teacher", unit="step")
    for picked in batches(train, args.batch, 10**9, args.seed + 7):
        ids = train[picked]
        loss = teacher(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if time.time() >= deadline and steps >= 2:
            break
    bar.close()
    teacher.eval().requires_grad_(False)
    return teacher, steps


def new_student(args, vocab: int):
    size = (24, 1, 2) if args.synthetic else (128, 2, 4)
    return llama(vocab, *size, args.seq_len, args.seed + 2)


def dense_step_loss(student, teacher, ids, **loss_kwargs):
    """½ CE + ½ divergence from both models' logits."""
    from kdkernels.llm.hf import causal_lm_distill_loss

    logits = student(input_ids=ids).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
    return causal_lm_distill_loss(logits, ids, teacher_logits=teacher_logits, kd_weight=0.5, ce_weight=0.5, **loss_kwargs)


def fused_linear_step_loss(student, teacher, ids, **loss_kwargs):
    """The same loss without logits: final hidden states and LM-head weights only."""
    from kdkernels.llm.hf import causal_lm_fused_linear_distill_loss, final_hidden_states

    _, student_hidden = final_hidden_states(student, {"input_ids": ids})
    with torch.no_grad():
        _, teacher_hidden = final_hidden_states(teacher, {"input_ids": ids})
    return causal_lm_fused_linear_distill_loss(student_hidden, student.get_output_embeddings(), teacher_hidden,
                                               teacher.get_output_embeddings(), ids, kd_weight=0.5, ce_weight=0.5, **loss_kwargs)


def compare_step(args, vocab: int, teacher, ids) -> list[dict]:
    """Peak extra memory and median time of one training step (forward of both models, loss,
    backward into the student's gradients) on the dense path and the fused-linear path, from the
    same student initialisation."""
    import statistics

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench._harness import cpu_peak_extra_bytes  # the benchmarks' CPU allocator peak (torch profiler)

    student = new_student(args, vocab)
    rows = []
    for mode, step_loss in (("dense", dense_step_loss), ("fused-linear", fused_linear_step_loss)):
        def run():
            student.zero_grad(set_to_none=True)  # the gradients are allocated inside every step
            loss = step_loss(student, teacher, ids, divergence="forward_kl")
            loss.backward()
            return loss.detach()

        loss = run()  # warm-up
        times = []
        for _ in range(args.compare_repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        peak = cpu_peak_extra_bytes(run)
        rows.append({"vocab": vocab, "tokens": ids.numel(), "mode": mode, "peak_extra_mib": peak / 2**20,
                     "step_ms": 1e3 * statistics.median(times), "loss": float(loss)})
    student.zero_grad(set_to_none=True)
    return rows


def train_student(args, name, train, val, teacher=None, store=None, fused_linear=False, **loss_kwargs):
    from tqdm.auto import tqdm

    from kdkernels.llm.hf import causal_lm_distill_loss

    student = new_student(args, args.vocab)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.01)
    for picked in tqdm(batches(train, args.batch, args.student_steps, args.seed + 11), total=args.student_steps, desc=name, unit="step"):
        ids = train[picked]
        if fused_linear:
            loss = fused_linear_step_loss(student, teacher, ids, **loss_kwargs)
        elif teacher is not None:
            loss = dense_step_loss(student, teacher, ids, **loss_kwargs)
        elif store is None:
            logits = student(input_ids=ids).logits
            loss = causal_lm_distill_loss(logits, ids, teacher_logits=logits.detach(), kd_weight=0.0, ce_weight=1.0)
        else:
            logits = student(input_ids=ids).logits
            topk = store.batch(picked.tolist(), seq_len=args.seq_len)
            loss = causal_lm_distill_loss(
                logits, ids, teacher_topk=(topk.indices, topk.values), teacher_mask=topk.mask, kd_weight=0.5, ce_weight=0.5,
                teacher_values="logprobs", stored_temperature=store.temperature, check_indices="off", **loss_kwargs,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return perplexity(student, val, args.batch)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    from kdkernels.llm import write_teacher_topk

    train_texts, val_texts = read_corpus(args.max_files)
    tokenizer = train_tokenizer(train_texts, args.vocab)
    args.vocab = tokenizer.get_vocab_size()
    train = to_sequences(tokenizer, train_texts, args.seq_len)
    val = to_sequences(tokenizer, val_texts, args.seq_len)[: args.val_seqs]
    print(f"corpus: {len(train_texts)} train / {len(val_texts)} val stdlib files; vocab {args.vocab}; "
          f"{len(train)} train / {len(val)} val sequences of {args.seq_len} tokens")

    start = time.time()
    teacher, teacher_steps = train_teacher(args, train, val)
    # The teacher saw every training sequence; the students (and so the stores) use the first N.
    train = train[: args.student_seqs]
    rows = [{"run": "teacher", "val_ppl": perplexity(teacher, val, args.batch), "bytes_per_token": "",
             "note": f"{teacher_steps} steps, {time.time() - start:.0f} s"}]
    print(f"teacher: {teacher_steps} steps, val ppl {rows[0]['val_ppl']:.2f}")

    runs = [("labels only", {}, None)]
    for divergence in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"):
        runs.append((f"dense {divergence}", {"divergence": divergence, "beta": 0.1 if divergence.startswith("skew") else 0.5}, "dense"))
    runs.append(("fused-linear forward_kl", {"divergence": "forward_kl", "beta": 0.5}, "fused"))
    stores = {}
    for k in (8, 32):
        k = min(k, args.vocab)
        batches_for_store = ({"input_ids": train[i : i + args.batch]} for i in range(0, len(train), args.batch))
        stores[k] = write_teacher_topk(teacher, batches_for_store, os.path.join(args.out, f"store_k{k}"), k=k,
                                       value_dtype=torch.bfloat16, overwrite=True, progress=True)
        runs.append((f"top-{k} tail_bucket forward_kl", {"divergence": "forward_kl", "tail": "tail_bucket"}, k))
    runs.append((f"top-{min(32, args.vocab)} renormalize forward_kl", {"divergence": "forward_kl", "tail": "renormalize"}, min(32, args.vocab)))

    for name, loss_kwargs, source in runs:
        ppl = train_student(
            args, name, train, val,
            teacher=teacher if source in ("dense", "fused") else None,
            store=stores.get(source) if isinstance(source, int) else None,
            fused_linear=source == "fused",
            **loss_kwargs,
        )
        store = stores.get(source) if isinstance(source, int) else None
        dense_bytes = args.vocab * 2  # bf16 logits
        note = {"dense": "teacher online (k = V); bytes = its bf16 logits", "fused": "teacher online, no logits (hidden states + heads)"}
        rows.append({"run": name, "val_ppl": ppl, "bytes_per_token": store.bytes_per_token if store else (dense_bytes if source == "dense" else ""),
                     "note": "stored top-k" if store else note.get(source, "")})
        print(f"{name}: val ppl {ppl:.2f}")

    ids = train[: args.batch]
    steps = compare_step(args, args.vocab, teacher, ids)
    big_teacher = llama(args.compare_vocab, *((48, 1, 2) if args.synthetic else (256, 4, 4)), args.seq_len, args.seed + 3)
    big_ids = torch.randint(0, args.compare_vocab, ids.shape, generator=torch.Generator().manual_seed(args.seed))
    steps += compare_step(args, args.compare_vocab, big_teacher.eval().requires_grad_(False), big_ids)
    with open(os.path.join(args.out, "step_comparison.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(steps[0]))
        writer.writeheader()
        writer.writerows(steps)

    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "val_ppl", "bytes_per_token", "note"])
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("| run | validation perplexity | teacher bytes / token | note |\n|---|---:|---:|---|\n")
        for row in rows:
            f.write(f"| {row['run']} | {row['val_ppl']:.2f} | {row['bytes_per_token']} | {row['note']} |\n")
        f.write(f"\nOne training step (student + teacher forward, ½ CE + ½ forward KL, backward), batch {args.batch} × "
                f"{args.seq_len} tokens; peak memory above the level before the step (CPU allocator):\n\n"
                "| vocabulary | path | peak extra memory (MiB) | step time (ms, median) | loss |\n|---:|---|---:|---:|---:|\n")
        for row in steps:
            f.write(f"| {row['vocab']} | {row['mode']} | {row['peak_extra_mib']:.1f} | {row['step_ms']:.0f} | {row['loss']:.6f} |\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r["run"] for r in rows][::-1], [r["val_ppl"] for r in rows][::-1], color="tab:blue")
    ax.set_xlabel("validation perplexity (lower is better)")
    ax.set_title("Student distilled from a Llama-style teacher on stdlib sources")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "perplexity.png"), dpi=120)
    print(open(os.path.join(args.out, "results.md")).read())
    print(f"total {time.time() - start:.0f} s; outputs in {args.out}")


if __name__ == "__main__":
    main()
