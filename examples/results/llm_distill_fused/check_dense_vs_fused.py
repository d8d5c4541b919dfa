"""Dense vs fused-linear student training on the llm_distill pipeline (stdlib corpus, BPE, the
example's sizes) with a 2-step teacher (--teacher-minutes 0): per-step losses of both paths from
the same initialisation and batches, and both validation perplexities. Run from the repository root."""
import sys, torch
sys.path.insert(0, "examples")
import llm_distill as ex
args = ex.parse_args(["--threads", "2", "--teacher-minutes", "0"])
torch.set_num_threads(2)
train_texts, val_texts = ex.read_corpus(args.max_files)
tok = ex.train_tokenizer(train_texts, args.vocab)
args.vocab = tok.get_vocab_size()
train = ex.to_sequences(tok, train_texts, args.seq_len)
val = ex.to_sequences(tok, val_texts, args.seq_len)[: args.val_seqs]
teacher, steps = ex.train_teacher(args, train, val)
train = train[: args.student_seqs]
print("teacher steps", steps, flush=True)
traj = {}
for mode, fn in (("dense", ex.dense_step_loss), ("fused", ex.fused_linear_step_loss)):
    student = ex.new_student(args, args.vocab)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for picked in ex.batches(train, args.batch, args.student_steps, args.seed + 11):
        ids = train[picked]
        loss = fn(student, teacher, ids, divergence="forward_kl", beta=0.5)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        losses.append(float(loss))
    traj[mode] = losses
    print(mode, "ppl", ex.perplexity(student, val, args.batch), flush=True)
for i, (a, b) in enumerate(zip(traj["dense"], traj["fused"])):
    if i % 5 == 0 or abs(a - b) / a > 1e-3:
        print(i, f"{a:.6f} {b:.6f} {abs(a-b)/a:.2e}")
