"""Python `peft` reference run on CoNLL-2003 NER, the baseline peft-rs compares itself against.

Setup (exactly; the Rust recipe recipes/bert-ner.toml should match it):
  model       sentence-transformers/all-MiniLM-L6-v2 as BertForTokenClassification, 9 CoNLL labels (IOB2)
  adapter     LoRA r=8, alpha=16, dropout 0.1 on query,value; classifier trainable (peft TOKEN_CLS
              puts it in modules_to_save); everything else frozen
  labels      first sub-token of each word carries the word's tag, other sub-tokens and [CLS]/[SEP]
              are -100; max length 128 tokens (truncation; words past it are predicted "O" at eval)
  batching    batch 32, shuffled each epoch (torch.Generator seeded), padded to the longest in the batch
  optimiser   torch AdamW lr 1e-3, weight decay 0.01 on every trainable parameter, betas (0.9, 0.999),
              eps 1e-8; linear schedule with ceil(6% of all steps) warmup steps; grad-norm clipping 1.0
  run         3 epochs, seed 42, torch.set_num_threads(2), CPU
  metrics     entity-level micro precision/recall/F1 with conlleval semantics (own scorer below, checked
              against the conlleval perl script), on valid after each epoch and on test at the end

Data: <assets>/data/conll2003/{train,valid,test}.txt from scripts/setup-assets.sh (assets =
$PEFT_RS_ASSETS or <repo>/assets); model from the Hugging Face cache (HF_HUB_OFFLINE=1 is set here).

Run:
  scripts/setup-assets.sh && scripts/python-env.sh
  .venv-py/bin/python benches/compare/peft_conll_reference.py --epochs 1 --limit-train 200 \\
      --out benches/compare/results/smoke.json                                 # smoke test, ~2 min
  nohup .venv-py/bin/python benches/compare/peft_conll_reference.py \\
      > benches/compare/results/peft_conll_reference.log 2>&1 &                 # full, ~15-25 min
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import AutoTokenizer, BertForTokenClassification, get_linear_schedule_with_warmup  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
LABEL2ID = {l: i for i, l in enumerate(LABELS)}


# ----------------------------------------------------------------------------- data
def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """Sentences as (words, tags); the tag is the last column; -DOCSTART- blocks are skipped."""
    sents, words, tags = [], [], []

    def flush():
        if words and words[0] != "-DOCSTART-":
            sents.append((list(words), list(tags)))
        words.clear()
        tags.clear()

    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.split()
            if not cols:
                flush()
                continue
            words.append(cols[0])
            tags.append(cols[-1])
    flush()
    return sents


def is_iob1(sents) -> bool:
    """True when some I-X starts an entity (after O or another type): the IOB1 convention."""
    for _, tags in sents:
        prev = "O"
        for t in tags:
            if t.startswith("I-") and (prev == "O" or prev[2:] != t[2:]):
                return True
            prev = t
    return False


def iob1_to_iob2(tags: list[str]) -> list[str]:
    out, prev = [], "O"
    for t in tags:
        if t.startswith("I-") and (prev == "O" or prev[2:] != t[2:]):
            t = "B-" + t[2:]
        out.append(t)
        prev = t
    return out


def encode(tokenizer, sents, max_length: int):
    """Token ids plus first-sub-token labels; word_index maps each labelled position to its word."""
    enc = tokenizer([w for w, _ in sents], is_split_into_words=True, truncation=True, max_length=max_length)
    examples, truncated = [], 0
    for i, (words, tags) in enumerate(sents):
        labels, first_pos, prev = [], [], None
        for pos, wid in enumerate(enc.word_ids(i)):
            if wid is None or wid == prev:
                labels.append(-100)
            else:
                labels.append(LABEL2ID[tags[wid]])
                first_pos.append((pos, wid))
            prev = wid
        if len(first_pos) < len(words):
            truncated += 1
        examples.append(
            dict(input_ids=enc["input_ids"][i], token_type_ids=enc["token_type_ids"][i], labels=labels,
                 first_pos=first_pos, n_words=len(words), gold=tags)
        )
    return examples, truncated


def collate(batch):
    n = max(len(e["input_ids"]) for e in batch)
    ids = torch.zeros(len(batch), n, dtype=torch.long)
    tt = torch.zeros(len(batch), n, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        tt[i, :k] = torch.tensor(e["token_type_ids"])
        mask[i, :k] = 1
        labels[i, :k] = torch.tensor(e["labels"])
    return dict(input_ids=ids, token_type_ids=tt, attention_mask=mask, labels=labels)


# ----------------------------------------------------------------------------- conlleval
def _split(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, _, typ = tag.partition("-")
    return prefix, typ


def _end_of_chunk(prev_tag, tag, prev_type, typ) -> bool:
    return (
        prev_tag in ("E", "S")
        or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
        or (prev_tag not in ("O", ".") and prev_type != typ)
    )


def _start_of_chunk(prev_tag, tag, prev_type, typ) -> bool:
    return (
        tag in ("B", "S")
        or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
        or (tag not in ("O", ".") and prev_type != typ)
    )


def conlleval(gold_sents: list[list[str]], pred_sents: list[list[str]]) -> dict:
    """Entity-level micro P/R/F1 exactly as the conlleval perl script computes them (any IOB scheme);
    sentence boundaries end chunks."""
    correct_chunks = found_gold = found_pred = correct_tags = tokens = 0
    per_type = Counter(), Counter(), Counter()  # correct, gold, pred
    for gold, pred in zip(gold_sents, pred_sents, strict=True):
        last_g, last_gt, last_p, last_pt, in_correct = "O", "", "O", "", False
        for g_tag, p_tag in list(zip(gold, pred, strict=True)) + [("O", "O")]:  # + boundary
            g, gt = _split(g_tag)
            p, pt = _split(p_tag)
            end_g = _end_of_chunk(last_g, g, last_gt, gt)
            end_p = _end_of_chunk(last_p, p, last_pt, pt)
            start_g = _start_of_chunk(last_g, g, last_gt, gt)
            start_p = _start_of_chunk(last_p, p, last_pt, pt)
            if in_correct:
                if end_g and end_p and last_gt == last_pt:
                    in_correct = False
                    correct_chunks += 1
                    per_type[0][last_gt] += 1
                elif end_g != end_p or gt != pt:
                    in_correct = False
            if start_g and start_p and gt == pt:
                in_correct = True
            if start_g:
                found_gold += 1
                per_type[1][gt] += 1
            if start_p:
                found_pred += 1
                per_type[2][pt] += 1
            last_g, last_gt, last_p, last_pt = g, gt, p, pt
        for g_tag, p_tag in zip(gold, pred):
            correct_tags += g_tag == p_tag
            tokens += 1
        # the boundary closes every chunk, so in_correct was settled above

    def prf(c, g, p):
        prec = c / p if p else 0.0
        rec = c / g if g else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        return dict(precision=prec, recall=rec, f1=f1, correct=c, gold=g, predicted=p)

    out = prf(correct_chunks, found_gold, found_pred)
    out["accuracy"] = correct_tags / tokens if tokens else 0.0
    types = sorted(set(per_type[1]) | set(per_type[2]))
    out["per_type"] = {t: prf(per_type[0][t], per_type[1][t], per_type[2][t]) for t in types}
    return out


# ----------------------------------------------------------------------------- train / eval
@torch.no_grad()
def evaluate(model, examples, batch_size: int) -> dict:
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    preds: list[list[str] | None] = [None] * len(examples)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = collate([examples[i] for i in idx])
        batch.pop("labels")
        logits = model(**batch).logits
        best = logits.argmax(-1)
        for row, i in enumerate(idx):
            e = examples[i]
            tags = ["O"] * e["n_words"]  # words lost to truncation stay "O"
            for pos, wid in e["first_pos"]:
                tags[wid] = LABELS[best[row, pos].item()]
            preds[i] = tags
    return conlleval([e["gold"] for e in examples], preds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit-train", type=int, default=None, metavar="N", help="use the first N train sentences")
    ap.add_argument("--limit-eval", type=int, default=None, metavar="N", help="use the first N valid/test sentences")
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("PEFT_RS_ASSETS", REPO / "assets")) / "data" / "conll2003")
    ap.add_argument("--out", type=Path, default=REPO / "benches/compare/results/peft_conll_reference.json")
    ap.add_argument("--save-adapter", type=Path, default=None, help="save the trained adapter (peft format) here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()

    started = time.time()
    loadavg_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    transformers.set_seed(args.seed)  # python, numpy, torch
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    def log(msg: str) -> None:
        print(f"[{time.time() - started:8.1f}s] {msg}", flush=True)

    # data
    splits = {}
    for split in ("train", "valid", "test"):
        path = args.data_dir / f"{split}.txt"
        if not path.is_file():
            sys.exit(f"missing {path}: run scripts/setup-assets.sh first (or pass --data-dir)")
        splits[split] = read_conll(path)
    scheme = "IOB1" if any(is_iob1(s) for s in splits.values()) else "IOB2"
    if scheme == "IOB1":
        splits = {k: [(w, iob1_to_iob2(t)) for w, t in v] for k, v in splits.items()}
    log(f"CoNLL-2003 sentences: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f"; tags {scheme}"
        + (" (converted to IOB2)" if scheme == "IOB1" else ""))
    if args.limit_train:
        splits["train"] = splits["train"][: args.limit_train]
    if args.limit_eval:
        splits["valid"] = splits["valid"][: args.limit_eval]
        splits["test"] = splits["test"][: args.limit_eval]

    tokenizer = AutoTokenizer.from_pretrained(MODEL_ID)
    data, truncated = {}, {}
    for k, v in splits.items():
        data[k], truncated[k] = encode(tokenizer, v, max_length=128)
    log(f"tokenized; sentences cut at 128 tokens: {truncated}")

    # model
    model = BertForTokenClassification.from_pretrained(
        MODEL_ID, dtype=torch.float32, num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id=LABEL2ID,
    )
    config = LoraConfig(task_type=TaskType.TOKEN_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                        target_modules=["query", "value"])
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = math.ceil(len(data["train"]) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup = math.ceil(0.06 * total_steps)
    sched = get_linear_schedule_with_warmup(opt, warmup, total_steps)
    gen = torch.Generator().manual_seed(args.seed)
    log(f"{steps_per_epoch} steps/epoch, {total_steps} steps, {warmup} warmup steps")

    epochs = []
    step = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(data["train"]), generator=gen).tolist()
        loss_sum, n_batches, tokens = 0.0, 0, 0
        for s in range(0, len(perm), args.batch_size):
            batch = collate([data["train"][i] for i in perm[s : s + args.batch_size]])
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_sum += loss.item()
            n_batches += 1
            tokens += int(batch["attention_mask"].sum())
            if step % args.log_every == 0:
                log(f"epoch {epoch} step {step}/{total_steps} loss {loss_sum / n_batches:.4f} "
                    f"lr {sched.get_last_lr()[0]:.2e} {(time.time() - t0) / n_batches:.3f}s/step")
        train_s = time.time() - t0
        t1 = time.time()
        valid = evaluate(model, data["valid"], args.batch_size)
        eval_s = time.time() - t1
        epochs.append(dict(epoch=epoch, train_seconds=train_s, steps=n_batches, train_tokens=tokens,
                           train_loss=loss_sum / n_batches, valid_eval_seconds=eval_s,
                           valid_precision=valid["precision"], valid_recall=valid["recall"], valid_f1=valid["f1"]))
        log(f"epoch {epoch}: train {train_s:.1f}s ({n_batches / train_s:.2f} steps/s, {tokens / train_s:.0f} tok/s), "
            f"loss {loss_sum / n_batches:.4f}; valid P {valid['precision']:.4f} R {valid['recall']:.4f} "
            f"F1 {valid['f1']:.4f} (eval {eval_s:.1f}s)")

    t2 = time.time()
    test = evaluate(model, data["test"], args.batch_size)
    test_s = time.time() - t2
    log(f"test P {test['precision']:.4f} R {test['recall']:.4f} F1 {test['f1']:.4f} (eval {test_s:.1f}s)")

    if args.save_adapter:
        model.save_pretrained(args.save_adapter)
        log(f"adapter saved to {args.save_adapter}")

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?") \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    result = dict(
        benchmark="peft_conll_reference",
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      transformers=transformers.__version__, peft=peft.__version__),
        machine=dict(cpu=cpu, logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     loadavg_at_start=loadavg_at_start, loadavg_at_end=os.getloadavg(),
                     note="2 shared cores: other processes (e.g. cargo builds) inflate the timings"),
        threads=args.threads,
        model=MODEL_ID,
        setup=dict(method="lora", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                   modules_to_save=["classifier"], max_length=128, batch_size=args.batch_size,
                   optimizer="AdamW", lr=1e-3, weight_decay=0.01, weight_decay_on="all trainable parameters",
                   schedule="linear", warmup_steps=warmup, warmup_ratio=0.06, total_steps=total_steps,
                   grad_clip_norm=1.0, epochs=args.epochs, seed=args.seed, label_first_subtoken_only=True,
                   padding="longest in batch", tag_scheme_in_data=scheme),
        data=dict(dir=str(args.data_dir), train_sentences=len(data["train"]), valid_sentences=len(data["valid"]),
                  test_sentences=len(data["test"]), truncated_at_128_tokens=truncated,
                  limit_train=args.limit_train, limit_eval=args.limit_eval),
        trainable_params=trainable,
        total_params=total,
        total_params_note="all parameters of the peft model: base, LoRA, and the classifier twice "
                          "(peft keeps the frozen original beside its trainable modules_to_save copy)",
        trainable_param_names=trainable_names,
        epoch_seconds=[e["train_seconds"] for e in epochs],
        valid_f1=[e["valid_f1"] for e in epochs],
        epochs=epochs,
        test=dict(precision=test["precision"], recall=test["recall"], f1=test["f1"], accuracy=test["accuracy"],
                  per_type=test["per_type"], eval_seconds=test_s),
        total_seconds=time.time() - started,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
