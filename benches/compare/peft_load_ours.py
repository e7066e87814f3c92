"""Loads an adapter folder written by peft-rs into Python peft and scores it on CoNLL-2003.

Checks the Rust -> Python direction of interoperability: `PeftModel.from_pretrained` must accept
our adapter_config.json + adapter_model.safetensors, and its entity F1 must equal what
`peft-rs eval` reports for the same adapter and split (same weights, same scorer semantics).

  .venv-py/bin/python benches/compare/peft_load_ours.py adapters/minilm-conll03-lora --split test \
      [--expect-f1 0.8123]   # fails if |F1 - expected| > 1e-3
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoTokenizer, BertForTokenClassification  # noqa: E402

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("ref", HERE / "peft_conll_reference.py")
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("adapter")
    ap.add_argument("--split", default="test")
    ap.add_argument("--expect-f1", type=float)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapter = Path(args.adapter)
    meta = json.loads((adapter / "peft_rs.json").read_text())
    config = json.loads((adapter / "adapter_config.json").read_text())
    id2label = {int(k): v for k, v in meta["id2label"].items()}
    labels = [id2label[i] for i in range(len(id2label))]
    # The reference helpers use their own label order; point them at this adapter's.
    ref.LABELS[:] = labels
    ref.LABEL2ID.clear()
    ref.LABEL2ID.update({l: i for i, l in enumerate(labels)})

    base = config["base_model_name_or_path"]
    model = BertForTokenClassification.from_pretrained(base, num_labels=len(labels), id2label=id2label,
                                                       label2id={v: k for k, v in id2label.items()})
    model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = Path(meta["settings"][f"data_{args.split}"])
    sents = ref.read_conll(data)
    examples, _ = ref.encode(tokenizer, sents, meta["settings"].get("max_length") or 512)
    scores = ref.evaluate(model, examples, 64)
    f1 = scores["overall"]["f1"] if "overall" in scores else scores["f1"]
    print(json.dumps({"adapter": str(adapter), "split": args.split, "python_peft_f1": f1}))
    if args.expect_f1 is not None and abs(f1 - args.expect_f1) > 1e-3:
        sys.exit(f"F1 in Python peft {f1:.4f} differs from the expected {args.expect_f1:.4f}")


if __name__ == "__main__":
    main()
