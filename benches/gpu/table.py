"""Markdown tables from one device run of benches/gpu/run-on-device.sh (peft-rs and Python peft
side by side, same machine, same call).

  python3 benches/gpu/table.py benches/gpu/results/run2   # reads run2-{rust,python,kernels}.json
"""

import json
import sys


def load(prefix, name):
    with open(f"{prefix}-{name}.json") as f:
        return json.load(f)


def by_name(doc):
    return {c["name"]: c for c in doc["cases"]}


def ms(c):
    if c is None or c.get("error"):
        return "error" if c else "-"
    return f"{c['median_ms']:.2f}"


def mib(c):
    b = c and c.get("peak_bytes")
    return f"{b / 2**20:,.0f}" if b else "-"


def main(prefix):
    rust, py, kern = load(prefix, "rust"), load(prefix, "python"), load(prefix, "kernels")
    r, p, k = by_name(rust), by_name(py), by_name(kern)
    env = py["env"]
    print(f"Card: {env['device_name']}; Python side torch {env['torch']}, transformers "
          f"{env['transformers']}, peft {env['peft']}; peft-rs {rust['env']['version']} "
          f"(`--features cuda`). bf16, batch 32, BERT-base shapes (random weights).\n")
    print("| case | peft-rs ms | Python peft ms | peft-rs / peft | peft-rs peak MiB | peft peak MiB | peft-rs fwd / bwd / opt ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in r:
        a, b = r[name], p.get(name)
        ratio = f"{a['median_ms'] / b['median_ms']:.2f}" if b and not b.get("error") and not a.get("error") else "-"
        phases = a.get("phases_ms")
        ph = " / ".join(f"{x:.1f}" for x in phases) if phases else ""
        print(f"| {name} | {ms(a)} | {ms(b)} | {ratio} | {mib(a)} | {mib(b)} | {ph} |")
    print()
    print("LoRA linear alone, bf16, forward + backward (frozen: dx only; LoRA: dx, dA, dB), median ms:\n")
    print("| (tokens, in, out, r) | frozen (peft-rs) | fused LoRA (peft-rs) | fused / frozen | unfused LoRA (peft-rs) | frozen (PyTorch) | unfused LoRA (PyTorch) | PyTorch ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    shapes = sorted({tuple(c["shape"]) for c in kern["cases"] if c["kind"] == "linear"}, key=lambda s: (s[0] * s[1] * s[2]))
    for s in shapes:
        tag = f"{s[0]}x{s[1]}x{s[2]}r{s[3]}"
        fr, fu, un = (k.get(f"linear/{m}/{tag}") for m in ("frozen", "lora_fused", "lora_unfused"))
        pf, pu = p.get(f"linear/frozen/{tag}"), p.get(f"linear/lora_unfused/{tag}")
        print(f"| {tuple(s)} | {ms(fr)} | {ms(fu)} | {fu['median_ms'] / fr['median_ms']:.2f} | {ms(un)} "
              f"| {ms(pf)} | {ms(pu)} | {pu['median_ms'] / pf['median_ms']:.2f} |")
    print()
    print("Many adapters in one batch (16 LoRAs, rows assigned round-robin, one row in 17 without), forward, median ms:\n")
    print("| (tokens, in, out, r) | base linear only | BGMV (one op) | one adapter at a time |")
    print("| --- | ---: | ---: | ---: |")
    multi = [c for c in kern["cases"] if c["kind"] == "multi_adapter"]
    for s in sorted({tuple(c["shape"]) for c in multi}):
        tag = f"{s[0]}x{s[1]}x{s[2]}r{s[3]}x16"
        cells = [ms(k.get(f"multi_adapter/{m}/{tag}")) for m in ("base_only", "bgmv", "per_adapter_loop")]
        print(f"| {tuple(s)} | " + " | ".join(cells) + " |")
    checks = kern.get("checks", [])
    failed = [c for c in checks if not c["pass"]]
    worst = {}
    for c in checks:
        key = (c["name"].split("/")[0], c["dtype"])
        worst[key] = max(worst.get(key, 0.0), c["rel"])
    print(f"\nKernel checks on the device: {len(checks)} comparisons against the CPU, {len(failed)} failed. "
          "Worst normwise error per op and dtype (bound: 1e-5 f32, 1e-2 bf16, 1e-4 training step, 0 dropout mask):\n")
    print("| op | f32 | bf16 |")
    print("| --- | ---: | ---: |")
    for op in sorted({k[0] for k in worst}):
        f = worst.get((op, "f32"))
        b = worst.get((op, "bf16"))
        print(f"| {op} | {f:.1e} | " + (f"{b:.1e}" if b is not None else "-") + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benches/gpu/results/run2")
