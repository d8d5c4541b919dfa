"""Dense vs fused-linear student training on the llm_distill pipeline (stdlib corpus, BPE, the
example's sizes; run from the repository root).

    --teacher-steps N    the teacher trained for exactly N steps (the default run's got 17)
    --mode trajectories  two students, one per path, from the same initialisation and batches:
                         their per-step losses (every 5th, and any that differ by > 1e-3) and
                         validation perplexities
    --mode gradients     one student trained with the dense gradients; at every step the
                         fused-linear loss and gradients on the same parameters are compared
                         (max |difference| / max |gradient| over all student parameters)
"""
import argparse
import sys

import torch

sys.path.insert(0, "examples")
import llm_distill as ex  # noqa: E402

cli = argparse.ArgumentParser()
cli.add_argument("--teacher-steps", type=int, default=2)
cli.add_argument("--mode", choices=("trajectories", "gradients"), default="trajectories")
cli.add_argument("--steps", type=int, default=100)
opts = cli.parse_args()
args = ex.parse_args(["--threads", "2"])
torch.set_num_threads(2)
train_texts, val_texts = ex.read_corpus(args.max_files)
tok = ex.train_tokenizer(train_texts, args.vocab)
args.vocab = tok.get_vocab_size()
train = ex.to_sequences(tok, train_texts, args.seq_len)
val = ex.to_sequences(tok, val_texts, args.seq_len)[: args.val_seqs]

teacher = ex.llama(args.vocab, 256, 4, 4, args.seq_len, args.seed + 1)  # as ex.train_teacher, by steps
opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3, weight_decay=0.01)
for picked in ex.batches(train, args.batch, opts.teacher_steps, args.seed + 7):
    ids = train[picked]
    loss = teacher(input_ids=ids, labels=ids).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
teacher.eval().requires_grad_(False)
train = train[: args.student_seqs]
print("teacher steps", opts.teacher_steps, "ppl", ex.perplexity(teacher, val, args.batch), flush=True)
paths = {"dense": ex.dense_step_loss, "fused": ex.fused_linear_step_loss}


def step_batches():
    return ex.batches(train, args.batch, opts.steps, args.seed + 11)


if opts.mode == "gradients":
    student = ex.new_student(args, args.vocab)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.01)
    for step, picked in enumerate(step_batches()):
        results = {}
        for mode in ("fused", "dense"):  # dense last: its gradients make the step
            opt.zero_grad(set_to_none=True)
            loss = paths[mode](student, teacher, train[picked], divergence="forward_kl")
            loss.backward()
            results[mode] = (loss.item(), [p.grad.clone() for p in student.parameters()])
        worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(results["fused"][1], results["dense"][1]))
        print(step, f"loss {results['dense'][0]:.6f} {results['fused'][0]:.6f} grad max|diff|/max|g| {worst:.2e}", flush=True)
        opt.step()
else:
    losses = {}
    for mode, step_loss in paths.items():
        student = ex.new_student(args, args.vocab)
        opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.01)
        losses[mode] = []
        for picked in step_batches():
            loss = step_loss(student, teacher, train[picked], divergence="forward_kl")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[mode].append(loss.item())
        print(mode, "ppl", ex.perplexity(student, val, args.batch), flush=True)
    for i, (a, b) in enumerate(zip(losses["dense"], losses["fused"])):
        if i % 5 == 0 or abs(a - b) / a > 1e-3:
            print(i, f"{a:.6f} {b:.6f} {abs(a - b) / a:.2e}")
