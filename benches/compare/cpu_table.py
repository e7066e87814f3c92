"""The side-by-side table of benches/compare/cpu_compare.sh: for each model and case, the median
over repetitions of each side's median step time, the throughput ratio (Python ms / peft-rs ms:
above 1 means peft-rs is faster), the peak RSS ratio (peft-rs / Python) and, for training cases,
the size of the folder each side saves (peft-rs `train`'s adapter folder, peft's `save_pretrained`).

  python3 benches/compare/cpu_table.py benches/compare/results/cpu
  python3 benches/compare/cpu_table.py benches/compare/results/cpu-zen5 --into BENCHMARKS.md

After the table it says where the numbers come from: the machine, date, commit and command (from
`run.json`, which cpu_compare.sh writes beside the results) and both sides' versions. With
`--into FILE` it also replaces FILE's block between `<!-- cpu_compare NAME -->` and
`<!-- /cpu_compare NAME -->`, NAME being the results folder's name (cpu, cpu-mkl, cpu-zen5, ...),
written atomically; a FILE without those markers is left as it is, with a note saying what to add.
"""

import glob
import json
import os
import re
import statistics
import sys


def provenance(folder, docs):
    """One paragraph: machine, date, commit and command (run.json), and both sides' versions."""
    run_path = os.path.join(folder, "run.json")
    run = {}
    if os.path.exists(run_path):
        with open(run_path) as f:
            run = json.load(f)
    py = next((d["env"] for d in docs if d.get("tool") == "python-peft"), {})
    rs = next((d["env"] for d in docs if d.get("tool") == "peft-rs"), {})
    parts = []
    if run:
        parts.append(f"Machine: {run.get('cpu', '?')}, {run.get('cores', '?')} cores; "
                     f"{run.get('date', '?')}, commit {run.get('commit', '?')}.")
    parts.append(f"Python side: torch {py.get('torch', '?')}, transformers {py.get('transformers', '?')}, "
                 f"peft {py.get('peft', '?')}, {py.get('threads', '?')} threads. peft-rs {rs.get('version', '?')}, "
                 f"f32 GEMM: {rs.get('f32_gemm', '?')}, {rs.get('threads', '?')} threads.")
    if run.get("command"):
        parts.append(f"Command: `{run['command']}`.")
    return " ".join(parts)


def into_file(path, name, text):
    """Replaces the marked block `name` of `path` with `text` (atomically); False without markers."""
    begin, end = f"<!-- cpu_compare {name} -->", f"<!-- /cpu_compare {name} -->"
    with open(path) as f:
        doc = f.read()
    if begin not in doc or end not in doc:
        return False
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")
    os.replace(tmp, path)
    return True


def table(folder):
    runs = {}
    docs = []
    for path in sorted(glob.glob(os.path.join(folder, "rep*-*-*.json"))):
        name = os.path.basename(path)[:-5]
        rep, rest = name.split("-", 1)
        model, side = rest.rsplit("-", 1)
        model = re.sub(r"-b\d+$", "", model)  # rep1-minilm-b8-rust.json: batch 8
        with open(path) as f:
            doc = json.load(f)
        docs.append(doc)
        for c in doc["cases"]:
            if c.get("error"):
                continue
            key = (model, c.get("batch") or 0, c["name"])
            runs.setdefault(key, {}).setdefault(side, []).append(c)
    lines = ["| model | batch | case | peft-rs ms | Python peft ms | throughput peft-rs / peft "
             "| peak RSS peft-rs / peft (MiB) | trainable | saved MB peft-rs / peft |",
             "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for (model, batch, case), sides in sorted(runs.items()):
        r, p = sides.get("rust", []), sides.get("python", [])
        if not r or not p:
            continue
        rm = statistics.median(c["median_ms"] for c in r)
        pm = statistics.median(c["median_ms"] for c in p)
        rr = max((c["peak_bytes"] or 0) for c in r)
        pr = max((c["peak_bytes"] or 0) for c in p)
        rss = f"{rr / pr:.2f} ({rr / 2**20:,.0f} / {pr / 2**20:,.0f})" if rr and pr else "-"
        trainable = r[0].get("trainable_params")
        ra, pa = r[0].get("adapter_bytes"), p[0].get("adapter_bytes")
        saved = f"{ra / 1e6:,.2f} / {pa / 1e6:,.2f}" if ra and pa else "-"
        lines.append(f"| {model} | {batch or '-'} | {case} | {rm:.0f} | {pm:.0f} | {pm / rm:.2f} | {rss} | "
                     + (f"{trainable:,}" if trainable else "") + f" | {saved} |")
    reps = max(len(v.get("rust", [])) for v in runs.values())
    lines.append(f"\n{len(runs)} cases; medians over {reps} interleaved repetitions per side. "
                 + provenance(folder, docs))
    return "\n".join(lines)


def main(argv):
    folder = argv[0] if argv and not argv[0].startswith("--") else "benches/compare/results/cpu"
    text = table(folder)
    print(text)
    if "--into" in argv:
        path = argv[argv.index("--into") + 1]
        name = os.path.basename(os.path.normpath(folder))
        if into_file(path, name, text):
            print(f"\n(wrote the table into {path}, block `{name}`)", file=sys.stderr)
        else:
            print(f"\n({path} has no block `{name}`: add the lines `<!-- cpu_compare {name} -->` and "
                  f"`<!-- /cpu_compare {name} -->` where the table goes)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
