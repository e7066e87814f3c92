"""The adapter-method comparison table from the runs of scripts/compare-methods.sh.

    python3 benches/compare/methods_table.py runs/methods full lora ... --budget "..." > table.md
    python3 benches/compare/methods_table.py --insert BENCHMARKS.md table.md

Reads runs/methods/<method>/summary.json (written by `peft-rs train`) and max_rss_kb.txt (GNU time).
Step time = seconds in training steps / optimizer steps (evaluation excluded). Trainable share is relative to
the full fine-tuning row's trainable count (every weight of the model and head).
"""

import argparse
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

BEGIN = "<!-- methods-table:begin -->"
END = "<!-- methods-table:end -->"


def describe(recipe: Path) -> str:
    lines = recipe.read_text().splitlines()
    return lines[1].lstrip("# ").rstrip(".") if len(lines) > 1 else recipe.stem


def table(root: Path, methods: list[str], budget: str) -> str:
    rows = []
    for m in methods:
        s = json.loads((root / m / "summary.json").read_text())
        rss = (root / m / "max_rss_kb.txt").read_text().strip().splitlines()[-1]
        train = s["train"]
        rows.append({
            "method": m,
            "what": describe(Path("recipes/methods") / f"{m}.toml"),
            "f1": s["test"]["overall"]["f1"] if s.get("test") else float("nan"),
            "valid": train["best"]["score"] if train.get("best") else float("nan"),
            "trainable": s["trainable_parameters"],
            "bytes": s["adapter_bytes"],
            "step_ms": 1000 * train.get("step_seconds", train["train_seconds"]) / max(train["steps"], 1),
            "rss_mb": int(rss) / 1024,
        })
    total = next((r["trainable"] for r in rows if r["method"] == "full"), None)
    cpu = "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = [
        f"Budget: {budget}, batch 32, max length 128, f32, 2 threads; {cpu}, {platform.system()}; "
        f"peft-rs {rev}. Command: `scripts/compare-methods.sh` (see its header for the budget variables).",
        "",
        "| method | what trains | test F1 | valid F1 | trainable | share | adapter bytes | step (ms) | peak RSS (MB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        share = f"{100 * r['trainable'] / total:.2f}%" if total else "n/a"
        out.append(
            f"| {r['method']} | {r['what']} | {r['f1']:.4f} | {r['valid']:.4f} | {r['trainable']:,} | {share} "
            f"| {r['bytes']:,} | {r['step_ms']:.0f} | {r['rss_mb']:.0f} |"
        )
    return "\n".join(out) + "\n"


def insert(doc: Path, table_file: Path) -> None:
    text = doc.read_text()
    block = f"{BEGIN}\n{table_file.read_text()}{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--insert", nargs=2, metavar=("DOC", "TABLE"))
    ap.add_argument("root", nargs="?")
    ap.add_argument("methods", nargs="*")
    ap.add_argument("--budget", default="")
    args = ap.parse_args()
    if args.insert:
        insert(Path(args.insert[0]), Path(args.insert[1]))
        return 0
    sys.stdout.write(table(Path(args.root), args.methods, args.budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
