"""Python `peft` side of the GPU benchmark: BERT-base training and inference steps, and the LoRA linear alone.

Setup (exactly; the Rust side emits the same JSON schema and should run the same cases):
  model       transformers.BertConfig() defaults (hidden 768, 12 layers, 12 heads, intermediate 3072,
              vocab 30522, dropout 0.1, default attention implementation, i.e. sdpa) as
              BertForTokenClassification with num_labels=9, random init with torch.manual_seed(0) on CPU,
              then moved to the device; parameters stay f32
  inputs      batch 32, seq 128 and 512: token ids uniform in [1000, 30000), attention mask all ones,
              labels uniform in [0, 9) (torch.Generator seeded 0); the same tensors every step
  precision   --dtype bf16 (default): forward (and loss) under torch.autocast(device_type, torch.bfloat16),
              backward outside it; --dtype f32: no autocast (TF32 matmuls stay off: torch's default)
  train       model.train() (dropout on); one step = zero_grad(set_to_none=True), forward with labels (the
              model's own cross-entropy loss), backward, optimizer.step(); torch.optim.AdamW lr 1e-4 over
              the trainable parameters (fused=True on CUDA, defaults otherwise). Methods:
                full      every parameter trainable
                lora-qv   peft LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query",
                          "value"], task_type=TOKEN_CLS): LoRA + the classifier (modules_to_save)
                lora-all  the same on every linear layer of the encoder: query, key, value,
                          attention.output.dense, intermediate.dense, output.dense (6 per layer); the
                          classifier is trainable through modules_to_save, not LoRA. Spelled as
                          target_modules=["query", "key", "value", "dense"] because peft 0.21's
                          "all-linear" keeps the classifier of a TOKEN_CLS model (it only drops the
                          output embeddings or, for SEQ_CLS, the head), which then clashes with
                          modules_to_save ("modules_to_save cannot be applied to modules of type
                          lora.Linear"); the script asserts the resolved set is all linears but classifier
  infer       model.eval(), torch.no_grad(), same autocast, forward without labels. Methods:
                base           the plain model
                lora-unmerged  LoRA r=8, alpha 16 on query,value (TOKEN_CLS as above) with lora_B drawn
                               from N(0, 0.02) (seeded) so the adapter is not a no-op
                lora-merged    that adapter after merge_and_unload() (checked against the unmerged
                               logits once, in f32, before timing)
  linear      one LoRA linear, bf16 tensors, no autocast, shapes (M tokens, K in, N out, r) =
              (4096,768,768,8) (4096,768,3072,8) (16384,768,768,8) (4096,4096,4096,16) (4096,4096,11008,16):
                frozen        y = F.linear(x, W), backward to x only (W frozen)
                lora_unfused  y = F.linear(x, W) + 2.0 * F.linear(F.linear(x, A), B), backward to x, A, B
              backward = torch.autograd.grad(y, inputs, grad_output) with a fixed random grad_output;
              the printed ratio is lora_unfused / frozen (derive it from median_ms in the JSON)
  timing      --warmup (10) untimed steps, then --steps (50) timed steps, each between two
              torch.cuda.Event records followed by a synchronize (CPU: time.perf_counter); median, p10,
              p90 (linear interpolation) in ms; tokens_per_s = batch * seq / median (linear: M / median)
  memory      peak_bytes = torch.cuda.max_memory_allocated() over the case, after the previous case was
              freed (gc + empty_cache) and reset_peak_memory_stats(): weights, gradients, optimizer
              state, activations and inputs; on the CPU the process's peak RSS over the case (reset
              through /proc/self/clear_refs, as `peft-rs bench` does)
  file size   adapter_bytes (train cases): the folder save_pretrained writes after the timed steps
              (peft: adapter_model.safetensors + adapter_config.json; full: the whole model)
  params      trainable_params: parameters with requires_grad in the trained model (peft counts the
              classifier copy in modules_to_save); null for infer; linear: 0 (frozen) or r*(K+N)

A case that fails (CUDA out of memory or anything else) gets "error": str(e) and null numbers; the JSON is
rewritten after every case, so a run cut short still leaves the finished cases.

JSON: {"tool": "python-peft", "env": {torch, transformers, peft, device_name, cuda, dtype}, "cases": [{kind,
name, method, batch, seq, shape, median_ms, p10_ms, p90_ms, tokens_per_s, peak_bytes, trainable_params,
error, adapter_bytes (train cases)}]}; kind train|infer|linear, name e.g. "train/lora-qv/seq128" or "linear/frozen/4096x768x768r8",
shape [M, K, N, r] for linear (batch and seq null there) and null otherwise.

Run:
  # CPU smoke test (tiny config: hidden 64, 2 layers, 4 heads, intermediate 128, batch 2, seq 16)
  OMP_NUM_THREADS=1 .venv-py/bin/python benches/compare/peft_gpu_bench.py --device cpu --small \\
      --steps 3 --warmup 1 --out /tmp/pgb.json
  # GPU (torch 2.11+ / transformers 5.x / peft 0.21); all cases should take a few minutes at most on an H100
  python benches/compare/peft_gpu_bench.py --out benches/compare/results/peft_gpu_bench.json
  python benches/compare/peft_gpu_bench.py --cases linear --out /tmp/linear.json
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import BertConfig, BertForTokenClassification  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NUM_LABELS = 9
LINEAR_SHAPES = [(4096, 768, 768, 8), (4096, 768, 3072, 8), (16384, 768, 768, 8),
                 (4096, 4096, 4096, 16), (4096, 4096, 11008, 16)]
LINEAR_SHAPES_SMALL = [(64, 32, 48, 4), (128, 32, 96, 4)]
LORA_SCALE = 2.0  # lora_alpha / r = 16 / 8
LORA_ALL_TARGETS = ["query", "key", "value", "dense"]  # every encoder linear; see the docstring


# ----------------------------------------------------------------------------- helpers
def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_steps(fn, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Run fn warmup times untimed, then steps times timed; milliseconds per step."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_bytes(device: torch.device):
    """CUDA: the allocator's peak; CPU: the process's peak RSS since `reset_peak` (Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Resets the peak RSS to the current RSS (Linux >= 4.0), as `peft-rs bench` does."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bert_config(model: str) -> BertConfig:
    """BERT shapes by name, as `peft-rs bench --model` (crates/peft-train/src/bench/mod.rs)."""
    if model == "tiny":
        return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          num_labels=NUM_LABELS)
    if model == "minilm":  # all-MiniLM-L6-v2's shape
        return BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                          num_labels=NUM_LABELS)
    return BertConfig(num_labels=NUM_LABELS)


_BASE_CACHE: dict[str, torch.nn.Module] = {}


def base_model(small: str) -> torch.nn.Module:
    """A fresh copy of the seed-0 randomly initialised CPU model (initialised once, then deep-copied)."""
    if small not in _BASE_CACHE:
        torch.manual_seed(0)
        _BASE_CACHE[small] = BertForTokenClassification(bert_config(small))
    return copy.deepcopy(_BASE_CACHE[small])


def lora_config(targets) -> LoraConfig:
    return LoraConfig(task_type=TaskType.TOKEN_CLS, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=targets)


def encoder_linears(plain: torch.nn.Module) -> list[str]:
    """Every nn.Linear of the plain model but the classifier: what lora-all must wrap."""
    return sorted(n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and n != "classifier")


def make_inputs(cfg: BertConfig, batch: int, seq: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, min(30000, cfg.vocab_size), (batch, seq), generator=g)
    labels = torch.randint(0, NUM_LABELS, (batch, seq), generator=g)
    return dict(input_ids=ids.to(device), attention_mask=torch.ones(batch, seq, dtype=torch.long, device=device),
                labels=labels.to(device))


def result(kind, name, method, batch=None, seq=None, shape=None) -> dict:
    return dict(kind=kind, name=name, method=method, batch=batch, seq=seq, shape=shape, median_ms=None,
                p10_ms=None, p90_ms=None, tokens_per_s=None, peak_bytes=None, trainable_params=None, error=None)


def fill_timing(res: dict, times: list[float], tokens: int) -> None:
    med = percentile(times, 50)
    res.update(median_ms=med, p10_ms=percentile(times, 10), p90_ms=percentile(times, 90),
               tokens_per_s=tokens / (med / 1e3))


# ----------------------------------------------------------------------------- cases
def train_case(res: dict, args, device: torch.device, seq: int) -> None:
    plain = base_model(args.model)
    cfg = plain.config
    method = res["method"]
    if method == "full":
        model = plain
    else:
        targets = ["query", "value"] if method == "lora-qv" else LORA_ALL_TARGETS
        want = encoder_linears(plain)
        torch.manual_seed(0)
        model = get_peft_model(plain, lora_config(targets))
        if method == "lora-all":
            got = sorted(model.targeted_module_names)
            assert got == want, f"lora-all wraps {got}, not every linear but the classifier {want}"
            print(f"# lora-all wraps {len(got)} linears: "
                  + ", ".join(sorted({n.split(".layer.0.", 1)[1] for n in got if ".layer.0." in n}))
                  + " in each layer", flush=True)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    res["trainable_params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    inputs = make_inputs(cfg, args.batch, seq, device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, args.dtype):
            loss = model(**inputs).loss
        loss.backward()
        opt.step()

    times = time_steps(step, device, args.warmup, args.steps)
    fill_timing(res, times, args.batch * seq)
    res["peak_bytes"] = peak_bytes(device)
    res["adapter_bytes"] = saved_bytes(model)


def saved_bytes(model: torch.nn.Module) -> int:
    """Bytes of the folder `save_pretrained` writes (peft: adapter + config; full: the model),
    read after the peak, so saving does not count in it."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)
                   if os.path.isfile(os.path.join(tmp, f)))


def lora_unmerged_model(small: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(base_model(small), lora_config(["query", "value"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02, generator=g)
    return model


def infer_case(res: dict, args, device: torch.device, seq: int) -> None:
    method = res["method"]
    model = base_model(args.model) if method == "base" else lora_unmerged_model(args.model)
    cfg = model.config
    model.to(device)
    model.eval()
    inputs = make_inputs(cfg, args.batch, seq, device)
    inputs.pop("labels")
    if method == "lora-merged":
        probe = {k: v[:2] for k, v in inputs.items()}
        with torch.no_grad():
            before = model(**probe).logits.float()
            model = model.merge_and_unload()
            after = model(**probe).logits.float()
            scale = before.abs().max().item()
            diff = (before - after).abs().max().item()
        left = [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]
        assert not left, f"peft modules left after merge_and_unload: {left[:5]}"
        # bf16 products (autocast, or the bf16 matmul precision) round the merged weight once
        # more than the two unmerged products: 8 significant bits instead of 24.
        bound = (1e-3 if args.dtype == "f32" and args.matmul_precision == "f32" else 1e-2) * max(scale, 1.0)
        assert diff <= bound, f"merged logits differ from unmerged by {diff} (max |logit| {scale})"
        print(f"# lora-merged seq{seq}: max |merged - unmerged| logits (f32) = {diff:.2e}", flush=True)
        del before, after
        free_memory(device)

    def step():
        with torch.no_grad(), autocast(device, args.dtype):
            model(**inputs)

    times = time_steps(step, device, args.warmup, args.steps)
    fill_timing(res, times, args.batch * seq)
    res["peak_bytes"] = peak_bytes(device)


def linear_case(res: dict, args, device: torch.device, shape) -> None:
    m, k, n, r = shape
    dt = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*size, std=1.0, grad=False):
        return (torch.randn(*size, generator=g, device=device, dtype=torch.float32) * std).to(dt) \
            .requires_grad_(grad)

    x = randn(m, k, grad=True)
    w = randn(n, k, std=k ** -0.5)
    go = randn(m, n)
    if res["method"] == "frozen":
        res["trainable_params"] = 0

        def step():
            y = F.linear(x, w)
            torch.autograd.grad(y, (x,), go)
    else:
        a = randn(r, k, std=k ** -0.5, grad=True)
        b = randn(n, r, std=0.02, grad=True)
        res["trainable_params"] = r * (k + n)

        def step():
            y = F.linear(x, w) + LORA_SCALE * F.linear(F.linear(x, a), b)
            torch.autograd.grad(y, (x, a, b), go)

    times = time_steps(step, device, args.warmup, args.steps)
    fill_timing(res, times, m)
    res["peak_bytes"] = peak_bytes(device)


# ----------------------------------------------------------------------------- main
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if Path("/proc/cpuinfo").exists():
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="train,infer,linear", help="comma list of train, infer, linear")
    ap.add_argument("--seqs", default=None, help="comma list of sequence lengths (default 128,512; --small 16)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 32; --small 2)")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="autocast dtype for train/infer")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny BERT and linear shapes, for a CPU smoke test")
    ap.add_argument("--model", choices=["bert-base", "minilm", "tiny"], default=None,
                    help="BERT shape (default bert-base; --small: tiny)")
    ap.add_argument("--methods", default=None,
                    help="comma list restricting train methods / infer variants (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--matmul-precision", choices=["f32", "bf16"], default="f32",
                    help="CPU: bf16 sets torch.backends.mkldnn.matmul.fp32_precision = 'bf16' (oneDNN runs f32 "
                         "matmuls with bf16 operands on AMX), as peft-rs bench --matmul-precision bf16")
    ap.add_argument("--out", type=Path, default=REPO / "benches/compare/results/peft_gpu_bench.json")
    args = ap.parse_args()

    if args.model is None:
        args.model = "tiny" if args.small else "bert-base"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.matmul_precision == "bf16":
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    wanted = set(m.strip() for m in args.methods.split(",")) if args.methods else None
    kinds = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = set(kinds) - {"train", "infer", "linear"}
    if bad:
        ap.error(f"unknown cases {sorted(bad)}")
    if args.batch is None:
        args.batch = 2 if args.small else 32
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else ([16] if args.small else [128, 512])
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:  # events, generators and memory stats all want one explicit device
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)

    out = dict(
        tool="python-peft",
        env=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                 device_name=device_name(device), cuda=torch.version.cuda, dtype=args.dtype,
                 model=args.model, threads=torch.get_num_threads(),
                 matmul_precision=args.matmul_precision),
        cases=[],
    )
    print(f"# torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}, "
          f"peft {peft.__version__}; {out['env']['device_name']}; dtype {args.dtype}; batch {args.batch}; "
          f"seqs {seqs}; warmup {args.warmup}, steps {args.steps}", flush=True)
    print(f"{'case':<40} {'median_ms':>10} {'tokens/s':>12} {'peak_MiB':>9}", flush=True)

    plan = []
    if "train" in kinds:
        plan += [(result("train", f"train/{m}/seq{s}", m, args.batch, s), train_case, s)
                 for m in ("full", "lora-qv", "lora-all") for s in seqs if not wanted or m in wanted]
    if "infer" in kinds:
        plan += [(result("infer", f"infer/{m}/seq{s}", m, args.batch, s), infer_case, s)
                 for m in ("base", "lora-unmerged", "lora-merged") for s in seqs if not wanted or m in wanted]
    if "linear" in kinds:
        for shape in LINEAR_SHAPES_SMALL if args.small else LINEAR_SHAPES:
            tag = "{}x{}x{}r{}".format(*shape)
            plan += [(result("linear", f"linear/{m}/{tag}", m, shape=list(shape)), linear_case, shape)
                     for m in ("frozen", "lora_unfused")]

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        tmp.replace(args.out)

    frozen_ms = {}
    for res, fn, arg in plan:
        free_memory(device)
        try:
            fn(res, args, device, arg)
        except Exception as e:  # OOM included: record it and go on
            res.update(median_ms=None, p10_ms=None, p90_ms=None, tokens_per_s=None, error=f"{type(e).__name__}: {e}")
            if device.type == "cuda" and res["peak_bytes"] is None:
                res["peak_bytes"] = peak_bytes(device)
        free_memory(device)
        out["cases"].append(res)
        write()
        if res["error"]:
            print(f"{res['name']:<40} ERROR {res['error'].splitlines()[0][:200]}", flush=True)
            continue
        peak = f"{res['peak_bytes'] / 2**20:9.1f}" if res["peak_bytes"] is not None else f"{'-':>9}"
        line = f"{res['name']:<40} {res['median_ms']:10.3f} {res['tokens_per_s']:12.0f} {peak}"
        if res["kind"] == "linear":
            key = tuple(res["shape"])
            if res["method"] == "frozen":
                frozen_ms[key] = res["median_ms"]
            elif key in frozen_ms:
                line += f"  ratio lora_unfused/frozen {res['median_ms'] / frozen_ms[key]:.2f}"
        print(line, flush=True)
    print(f"# wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
