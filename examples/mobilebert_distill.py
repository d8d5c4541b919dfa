"""MobileBERT's recipe on real text, offline: a small BERT teacher, a MobileBERT-style student.

Corpus: the docstrings of the Python standard library installed with this interpreter (parsed
with ``ast``; nothing is downloaded). A byte-level BPE tokenizer is trained on it with
``tokenizers``; the text is cut into fixed-length sequences, one in ten documents held out.

1. Teacher: ``transformers.BertForPreTraining`` from a small config, pre-trained with masked
   language modelling (BERT's 15 % masking, 80/10/10).
2. Student: ``transformers.MobileBertForPreTraining`` (bottlenecks, stacked FFNs, the teacher's
   hidden width between blocks and its number of layers and heads), trained three ways for the
   same number of steps:
   - ``mlm only``: the MLM loss alone;
   - ``stage 1 + stage 2``: progressive layer-wise transfer (feature maps ×100, attention ×1,
     mean ×5000, variance ×5; one phase per layer, lr ×0 / ×3 / ×0.3 before / during / after it,
     the rest of the model frozen), then pre-training distillation (MLM CE against
     0.5·one-hot + 0.5·teacher softmax);
   - ``stage 2 only``: pre-training distillation for all the steps.
Prints and writes the held-out masked-token accuracy and MLM loss of every model.

    python examples/mobilebert_distill.py               # the full run: minutes on 2 CPU cores
    python examples/mobilebert_distill.py --synthetic   # tiny models, a few steps: a smoke test (CI)
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sysconfig
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from _common import str_args, write_table_and_json
from kdkernels.distill import LayerwiseTransferSchedule, progressive_transfer_losses
from kdkernels.distill.adapters import BertFeatures
from kdkernels.distill.methods.mobilebert_pretraining import pretraining_distillation_loss

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}


def stdlib_docstrings(max_chars: int) -> list[str]:
    """Docstrings of modules, classes and functions of the standard library, in a fixed order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.append(" ".join(doc.split()))
                    total += len(docs[-1])
        if total >= max_chars:
            break
    return docs


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(docs, trainer)
    return tokenizer


def make_sequences(docs: list[str], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] + (seq_len − 2) tokens + [SEP] windows over the concatenated documents; every tenth
    document goes to the held-out split."""
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    streams = {"train": [], "test": []}
    for i, encoding in enumerate(tokenizer.encode_batch(docs)):
        streams["test" if i % 10 == 0 else "train"].extend(encoding.ids + [sep_id])
    out = []
    body = seq_len - 2
    for split in ("train", "test"):
        ids = streams[split]
        n = len(ids) // body
        chunks = torch.tensor(ids[: n * body]).view(n, body)
        out.append(torch.cat([torch.full((n, 1), cls_id), chunks, torch.full((n, 1), sep_id)], dim=1))
    return out[0], out[1]


def mask_tokens(ids: torch.Tensor, vocab_size: int, mask_id: int, g: torch.Generator, special_below: int = len(SPECIALS)):
    """BERT masking: 15 % of the non-special positions are predicted; of them 80 % become [MASK],
    10 % a random token, 10 % stay. Labels are −100 elsewhere."""
    labels = ids.clone()
    chosen = (torch.rand(ids.shape, generator=g) < 0.15) & (ids >= special_below)
    labels[~chosen] = -100
    inputs = ids.clone()
    roll = torch.rand(ids.shape, generator=g)
    inputs[chosen & (roll < 0.8)] = mask_id
    random_tokens = torch.randint(special_below, vocab_size, ids.shape, generator=g)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_tokens[swap]
    return inputs, labels


def teacher_config(args, vocab_size: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, max_position_embeddings=args.seq_len, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def student_config(args, vocab_size: int):
    from transformers import MobileBertConfig

    # MobileBERT's shape, scaled: inter-block width = the teacher's hidden size, a 4× narrower
    # bottleneck inside the blocks, stacked FFNs, the teacher's numbers of layers and heads.
    inner = args.hidden // 4
    return MobileBertConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, embedding_size=args.hidden // 2, true_hidden_size=inner,
        intra_bottleneck_size=inner, num_hidden_layers=args.layers, num_attention_heads=args.heads, intermediate_size=4 * inner,
        num_feedforward_networks=args.ffns, max_position_embeddings=args.seq_len, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def build(kind: str, args, vocab_size: int, seed: int):
    from transformers import BertForPreTraining, MobileBertForPreTraining

    torch.manual_seed(seed)
    if kind == "teacher":
        return BertForPreTraining._from_config(teacher_config(args, vocab_size), attn_implementation="eager")
    return MobileBertForPreTraining._from_config(student_config(args, vocab_size), attn_implementation="eager")


def linear_decay(optimizer, step: int, total: int, warmup: int) -> None:
    scale = (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * scale


def masked_logits(model, inputs: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """MLM logits at the masked positions only: the encoder, then the MLM head on those rows
    (the head over every position would cost more than the encoder at these sizes)."""
    hidden = model.base_model(input_ids=inputs).last_hidden_state
    return model.cls.predictions(hidden[masked])


@torch.no_grad()
def evaluate(model, test_inputs, test_labels, batch: int) -> dict[str, float]:
    """Masked-token accuracy and mean MLM CE over the held-out masked positions."""
    model.eval()
    correct = loss = count = 0.0
    for i in range(0, len(test_inputs), batch):
        labels = test_labels[i : i + batch]
        masked = labels != -100
        logits = masked_logits(model, test_inputs[i : i + batch], masked)
        loss += F.cross_entropy(logits, labels[masked], reduction="sum").item()
        correct += (logits.argmax(-1) == labels[masked]).sum().item()
        count += masked.sum().item()
    return {"accuracy": correct / count, "mlm_loss": loss / count}


class Batches:
    """Random training batches with fresh masks every time."""

    def __init__(self, train: torch.Tensor, args, vocab_size: int, mask_id: int, seed: int) -> None:
        self.train, self.args, self.vocab_size, self.mask_id = train, args, vocab_size, mask_id
        self.g = torch.Generator().manual_seed(seed)

    def next(self):
        idx = torch.randint(0, len(self.train), (self.args.batch,), generator=self.g)
        return mask_tokens(self.train[idx], self.vocab_size, self.mask_id, self.g)


def train_mlm(model, batches: Batches, steps: int, lr: float, progress, name: str) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params, "base_lr": lr}], lr=lr, weight_decay=0.01)
    model.train()
    for step in range(steps):
        linear_decay(optimizer, step, steps, max(1, steps // 10))
        inputs, labels = batches.next()
        masked = labels != -100
        loss = F.cross_entropy(masked_logits(model, inputs, masked), labels[masked])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.update()
        progress.set_postfix({name: f"{loss.item():.3f}"})


def stage1_progressive_transfer(student, teacher, batches: Batches, steps: int, lr: float, progress) -> None:
    """Layer-wise transfer: the official phase gates and per-layer lr multipliers."""
    layers = student.config.num_hidden_layers
    schedule = LayerwiseTransferSchedule(num_layers=layers, total_steps=steps)
    optimizer = torch.optim.AdamW(schedule.param_groups(student, "mobilebert.encoder.layer", lr=lr), lr=lr, weight_decay=0.01)
    # The encoders only: stage 1 reads hidden states and attention scores, not the MLM head.
    s_features, t_features = BertFeatures(student.base_model), BertFeatures(teacher.base_model)
    student.train()
    teacher.eval()
    for step in range(steps):
        schedule.apply(step, optimizer=optimizer)
        inputs, _ = batches.next()
        with torch.no_grad(), t_features:
            teacher.base_model(input_ids=inputs)
        with s_features:
            student.base_model(input_ids=inputs)
        losses = progressive_transfer_losses(
            s_features.hidden_states(), t_features.hidden_states(), s_features.attention_scores(), t_features.attention_scores(),
            schedule.loss_gates(step),
        )
        s_features.clear(), t_features.clear()
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        progress.update()
        progress.set_postfix({"stage1": f"{total.item():.3f}", "layer": schedule.phase(step)})
    s_features.remove(), t_features.remove()


def stage2_pretraining_distillation(student, teacher, batches: Batches, steps: int, lr: float, progress) -> None:
    optimizer = torch.optim.AdamW([{"params": list(student.parameters()), "base_lr": lr}], lr=lr, weight_decay=0.01)
    student.train()
    teacher.eval()
    for step in range(steps):
        linear_decay(optimizer, step, steps, max(1, steps // 10))
        inputs, labels = batches.next()
        masked = labels != -100
        with torch.no_grad():
            teacher_logits = masked_logits(teacher, inputs, masked)
        loss = pretraining_distillation_loss(masked_logits(student, inputs, masked), teacher_logits, labels[masked])["mlm"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.update()
        progress.set_postfix({"stage2": f"{loss.item():.3f}"})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", action="store_true", help="tiny corpus, models and step counts (seconds)")
    parser.add_argument("--max-chars", type=int, default=1_500_000, help="corpus size in characters")
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64, help="teacher hidden = student inter-block width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffns", type=int, default=2, help="student's stacked FFNs per layer (MobileBERT: 4)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--teacher-steps", type=int, default=4000)
    parser.add_argument("--stage1-steps", type=int, default=600)
    parser.add_argument("--stage2-steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=1e-3, help="the students' learning rate")
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (more than 1 is slower on a busy machine)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/out/mobilebert"))
    args = parser.parse_args(argv)
    if args.synthetic:
        args.max_chars, args.vocab, args.seq_len, args.hidden, args.layers, args.heads = 20_000, 300, 16, 16, 2, 2
        args.batch, args.teacher_steps, args.stage1_steps, args.stage2_steps = 8, 4, 4, 4
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    docs = stdlib_docstrings(args.max_chars)
    tokenizer = train_tokenizer(docs, args.vocab)
    vocab_size = tokenizer.get_vocab_size()
    train, test = make_sequences(docs, tokenizer, args.seq_len)
    mask_id = tokenizer.token_to_id("[MASK]")
    test_inputs, test_labels = mask_tokens(test, vocab_size, mask_id, torch.Generator().manual_seed(1234))
    print(f"corpus: {len(docs)} docstrings, {sum(map(len, docs))} chars; vocab {vocab_size}; {len(train)} train / {len(test)} test sequences of {args.seq_len}")

    student_steps = args.stage1_steps + args.stage2_steps
    total_steps = args.teacher_steps + 3 * student_steps
    results = {}
    with tqdm(total=total_steps, desc="mobilebert example", unit="step") as progress:
        teacher = build("teacher", args, vocab_size, args.seed)
        train_mlm(teacher, Batches(train, args, vocab_size, mask_id, args.seed), args.teacher_steps, args.teacher_lr, progress, "teacher")
        teacher.requires_grad_(False)
        results["teacher (BERT, MLM)"] = evaluate(teacher, test_inputs, test_labels, args.batch)

        student = build("student", args, vocab_size, args.seed + 1)
        train_mlm(student, Batches(train, args, vocab_size, mask_id, args.seed + 1), student_steps, args.lr, progress, "student")
        results["student: MLM only"] = evaluate(student, test_inputs, test_labels, args.batch)

        student = build("student", args, vocab_size, args.seed + 1)
        batches = Batches(train, args, vocab_size, mask_id, args.seed + 1)
        stage1_progressive_transfer(student, teacher, batches, args.stage1_steps, args.lr, progress)
        stage2_pretraining_distillation(student, teacher, batches, args.stage2_steps, args.lr, progress)
        results["student: stage 1 + stage 2"] = evaluate(student, test_inputs, test_labels, args.batch)

        student = build("student", args, vocab_size, args.seed + 1)
        stage2_pretraining_distillation(student, teacher, Batches(train, args, vocab_size, mask_id, args.seed + 1), student_steps, args.lr, progress)
        results["student: stage 2 only"] = evaluate(student, test_inputs, test_labels, args.batch)

    params = {
        "teacher": sum(p.numel() for p in teacher.parameters()),
        "student": sum(p.numel() for p in student.parameters()),
    }
    lines = [
        f"teacher BERT {params['teacher'] / 1e6:.2f} M parameters, {args.teacher_steps} MLM steps; student MobileBERT "
        f"{params['student'] / 1e6:.2f} M parameters, {student_steps} steps each (stage 1: {args.stage1_steps}, stage 2: "
        f"{args.stage2_steps}); batch {args.batch} × {args.seq_len} tokens; {time.perf_counter() - start:.0f} s in all",
        "",
        "| model | masked-token accuracy | MLM loss |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {r['accuracy']:.4f} | {r['mlm_loss']:.3f} |" for name, r in results.items()]
    table = "\n".join(lines)
    write_table_and_json(args.out, "mobilebert_results", table, {"args": str_args(args), "results": results, "parameters": params})
    return results


if __name__ == "__main__":
    main()
