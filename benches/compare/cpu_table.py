"""The side-by-side table of benches/compare/cpu_compare.sh: for each model and case, the median
over repetitions of each side's median step time, the throughput ratio (Python ms / peft-rs ms:
above 1 means peft-rs is faster) and the peak RSS ratio (peft-rs / Python).

  python3 benches/compare/cpu_table.py benches/compare/results/cpu
"""

import glob
import json
import os
import statistics
import sys


def main(folder):
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "rep*-*-*.json"))):
        name = os.path.basename(path)[:-5]
        rep, rest = name.split("-", 1)
        model, side = rest.rsplit("-", 1)
        with open(path) as f:
            doc = json.load(f)
        for c in doc["cases"]:
            if c.get("error"):
                continue
            runs.setdefault((model, c["name"]), {}).setdefault(side, []).append(c)
    print("| model | case | peft-rs ms | Python peft ms | throughput peft-rs / peft | peak RSS peft-rs / peft (MiB) | trainable |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for (model, case), sides in sorted(runs.items()):
        r, p = sides.get("rust", []), sides.get("python", [])
        if not r or not p:
            continue
        rm = statistics.median(c["median_ms"] for c in r)
        pm = statistics.median(c["median_ms"] for c in p)
        rr = max((c["peak_bytes"] or 0) for c in r)
        pr = max((c["peak_bytes"] or 0) for c in p)
        rss = f"{rr / pr:.2f} ({rr / 2**20:,.0f} / {pr / 2**20:,.0f})" if rr and pr else "-"
        trainable = r[0].get("trainable_params")
        print(f"| {model} | {case} | {rm:.0f} | {pm:.0f} | {pm / rm:.2f} | {rss} | "
              + (f"{trainable:,}" if trainable else "") + " |")
    print(f"\n{len({k for k in runs})} cases; medians over {max(len(v.get('rust', [])) for v in runs.values())} "
          "interleaved repetitions per side.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benches/compare/results/cpu")
