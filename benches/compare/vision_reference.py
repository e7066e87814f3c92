"""Python reference for Fashion-MNIST on MobileNetV2 (torchvision + peft), the baseline the Rust vision
recipes must beat.

The reference numbers quoted in the issue come from exactly these settings (all defaults here):
  model       torchvision mobilenet_v2(weights="IMAGENET1K_V1") (offline: the torch hub cache,
              ~/.cache/torch/hub/checkpoints/mobilenet_v2-b0353104.pth from scripts/setup-assets.sh;
              TORCH_HOME moves it); classifier replaced by Dropout(0.2) + Linear(1280, 10) (torch's
              default Linear init after torch.manual_seed(seed))
  modes       head         only the classifier is trainable (12,810 parameters)
              lora         peft LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_REGEX,
                           modules_to_save=["classifier"]): every 1x1 Conv2d of `features` (34 modules:
                           features.N.conv.0.0 expand for N=2..17, features.1.conv.1 and features.N.conv.2
                           project, features.18.0), 161,034 trainable (148,224 LoRA + 12,810 head);
                           --train-bn-affine also trains every BatchNorm's gain and bias (34,112 more,
                           peft-rs: tuning.unfreeze; they are not in the saved adapter)
              last-blocks  features.16, features.17, features.18 and the classifier trainable
              full         every parameter trainable
  data        Fashion-MNIST IDX files (gzip) in <assets>/data/fashion-mnist/ (assets = $PEFT_RS_ASSETS or
              <repo>/assets); train: a seeded stratified subset of the 60,000 (--train-limit, default
              20,000 = 2,000 per class); test: all 10,000 (--test-limit N takes the first N)
  preprocess  28x28 uint8 -> PIL "L" -> Resize(64) (bilinear, PIL) -> Grayscale(3 channels) -> ToTensor
              -> Normalize(ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225));
              training augmentation: RandomHorizontalFlip(0.5) only
  training    model.train() (BatchNorm uses batch statistics and updates its running statistics, also in
              frozen layers, as torchvision/peft do by default; Dropout active); eval() for testing.
              batch 64, shuffled every epoch (seeded), last batch partial (steps/epoch = ceil(N / 64),
              313 for 20,000); cross-entropy loss; no gradient clipping
  optimiser   torch AdamW(all trainable parameters, BatchNorm gains and biases included, lr, weight_decay 0.01, betas (0.9, 0.999), eps 1e-8);
              OneCycleLR(max_lr=lr, total_steps=epochs * steps/epoch, pct_start=0.3) with torch's other
              defaults: cosine annealing, initial lr = lr/25, final lr = lr/(25 * 1e4), and
              cycle_momentum=True, i.e. AdamW's beta1 goes 0.95 -> 0.85 (while the lr rises) -> 0.95
  lr defaults head 1e-3, lora 1e-3, last-blocks 5e-4, full 3e-4 (--lr overrides)
  run         3 epochs, seed 42, torch.set_num_threads(2), CPU, float32

Data path (--data precompute|loader):
  precompute (default): every image is resized once up front with the same PIL transform (timed as
    preprocess_seconds, not part of the training time) and kept as uint8 64x64 (20,000 images: 82 MB);
    each batch is then converted with the same tensor ops as ToTensor + Normalize (x / 255, -mean, /std),
    and flipped per sample (seeded generator). The tensors equal the per-image pipeline's exactly.
  loader: a torch DataLoader (num_workers=0, so the threads are the model's) running the torchvision
    transforms per image every epoch; the transform time is then inside the training time.

Output: a JSON record (printed, and written to --json PATH): mode, test accuracy, trainable / total
parameters, training wall time, time per step, eval time, preprocessing time, peak RSS
(resource.getrusage maxrss), adapter size (lora: the save_pretrained folder; other modes: the trainable
tensors saved as one safetensors file), the size of the BatchNorm running statistics (which training
changes but neither artefact contains), versions, threads, load average, per-epoch loss/accuracy.

Run:
  scripts/setup-assets.sh && scripts/python-env.sh
  # smoke test (~1 min per mode on 2 shared cores)
  .venv-py/bin/python benches/compare/vision_reference.py --mode lora --train-limit 512 --epochs 1 \\
      --test-limit 512 --json /tmp/vision_smoke_lora.json
  # full reference, one mode at a time (each several minutes on 2 idle cores)
  for m in head lora last-blocks full; do
    .venv-py/bin/python benches/compare/vision_reference.py --mode $m \\
        --json benches/compare/results/vision_reference_$m.json \\
        > benches/compare/results/vision_reference_$m.log 2>&1
  done
"""

import argparse
import gzip
import json
import math
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
import safetensors
import torch
import torchvision
from PIL import Image
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn
from torchvision import transforms as T

REPO = Path(__file__).resolve().parents[2]
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
LORA_REGEX = r"features\.(1\.conv\.1|([2-9]|1[0-7])\.conv\.(0\.0|2)|18\.0)"
DEFAULT_LR = {"head": 1e-3, "lora": 1e-3, "last-blocks": 5e-4, "full": 3e-4}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 10


# ----------------------------------------------------------------------------- data
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): uint8 images [N, 28, 28] or labels [N]."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x00000801 labels, 0x00000803 images: unsigned byte data
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: {data.size} bytes for dims {dims}")
    return data.reshape(dims)


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    paths = [data_dir / f"{prefix}-images-idx3-ubyte.gz", data_dir / f"{prefix}-labels-idx1-ubyte.gz"]
    for p in paths:
        if not p.is_file():
            sys.exit(f"missing {p}: run scripts/setup-assets.sh first (or pass --data-dir)")
    return read_idx(paths[0]), read_idx(paths[1])


def stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Seeded, class-balanced subset: limit // 10 per class (the first limit % 10 classes get one more),
    each class's images drawn by a seeded permutation; returned sorted (file order)."""
    if limit <= 0 or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        quota = limit // NUM_CLASSES + (1 if c < limit % NUM_CLASSES else 0)
        picked.append(rng.permutation(idx)[:quota])
    return np.sort(np.concatenate(picked))


def load_data(data_dir: Path, train_limit: int, test_limit: int, seed: int):
    """(train images, train labels, test images, test labels): a seeded stratified subset of `train_limit`
    training images and the first `test_limit` test images (0: all)."""
    train_images, train_labels = load_split(data_dir, "train")
    test_images, test_labels = load_split(data_dir, "test")
    sub = stratified_subset(train_labels, train_limit, seed)
    train_images, train_labels = train_images[sub], train_labels[sub]
    if test_limit > 0:
        test_images, test_labels = test_images[:test_limit], test_labels[:test_limit]
    return train_images, train_labels, test_images, test_labels


def resize_transform(size: int) -> T.Compose:
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), T.Grayscale(num_output_channels=3)])


def tensor_transform() -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])


def precompute(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, size, size]: the PIL Resize output (Grayscale then only copies it to 3 channels)."""
    resize = resize_transform(size)
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i, img in enumerate(images):
        rgb = np.asarray(resize(Image.fromarray(img)))
        out[i] = rgb[:, :, 0]
    return torch.from_numpy(out)


class Normalizer:
    """ToTensor + Normalize on a uint8 batch, with the same elementwise ops as torchvision."""

    def __init__(self):
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    def __call__(self, u8: torch.Tensor) -> torch.Tensor:
        x = u8.unsqueeze(1).expand(-1, 3, -1, -1).to(torch.float32).div(255)
        return x.sub(self.mean).div(self.std)


class FashionDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int, train: bool):
        self.images, self.labels = images, labels
        steps = [T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), T.Grayscale(num_output_channels=3)]
        if train:
            steps.append(T.RandomHorizontalFlip(0.5))
        self.transform = T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


# ----------------------------------------------------------------------------- model
def build_model(mode: str, lora_r: int, lora_alpha: int, lora_dropout: float, train_bn_affine: bool = False) -> nn.Module:
    try:
        model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    except Exception as e:  # noqa: BLE001 -- offline, the download fails when the file is absent
        hub = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
        sys.exit(f"cannot load the MobileNetV2 ImageNet weights (expected at {hub}): {e}\n"
                 "run scripts/setup-assets.sh or set TORCH_HOME")
    model.classifier[1] = nn.Linear(model.last_channel, NUM_CLASSES)
    if mode == "lora":
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=LORA_REGEX,
                            modules_to_save=["classifier"])
        model = get_peft_model(model, config)
        if train_bn_affine:  # BatchNorm gains and biases trained beside LoRA (peft-rs: tuning.unfreeze)
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(True)
                    m.bias.requires_grad_(True)
        return model
    for name, p in model.named_parameters():
        if mode == "full":
            p.requires_grad_(True)
        elif mode == "head":
            p.requires_grad_(name.startswith("classifier."))
        elif mode == "last-blocks":
            p.requires_grad_(name.startswith(("classifier.", "features.16.", "features.17.", "features.18.")))
        else:
            raise ValueError(mode)
    return model


def bn_buffers(model: nn.Module) -> dict:
    return {n: b.detach().clone().contiguous() for n, b in model.named_buffers()
            if n.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@torch.no_grad()
def evaluate(model, batches) -> tuple[float, int]:
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / max(total, 1), total


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", required=True, choices=["head", "lora", "last-blocks", "full"])
    ap.add_argument("--train-limit", type=int, default=20000, metavar="N",
                    help="seeded stratified subset of the 60,000 training images (0 = all)")
    ap.add_argument("--test-limit", type=int, default=0, metavar="N", help="first N test images (0 = all 10,000)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=64, help="input side after Resize")
    ap.add_argument("--lr", type=float, default=None, help="max lr of OneCycleLR; default per mode: "
                    + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()))
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--pct-start", type=float, default=0.3)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--train-bn-affine", action="store_true",
                    help="lora: also train every BatchNorm's gain and bias (not in the saved adapter)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--data", choices=["precompute", "loader"], default="precompute")
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("PEFT_RS_ASSETS", REPO / "assets")) / "data" / "fashion-mnist")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the JSON record here")
    ap.add_argument("--save-dir", type=Path, default=None,
                    help="keep the trained artefact here (adapter folder / trainable.safetensors) plus "
                         "bn_running_stats.safetensors; default: a temporary folder, deleted")
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.mode]

    started = time.time()
    loadavg_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    def log(msg: str) -> None:
        print(f"[{time.time() - started:8.1f}s] {msg}", flush=True)

    # data
    train_images, train_labels, test_images, test_labels = load_data(
        args.data_dir, args.train_limit, args.test_limit, args.seed)
    n_train, n_test = len(train_labels), len(test_labels)
    log(f"Fashion-MNIST: train {n_train} (per class {np.bincount(train_labels, minlength=10).tolist()}), "
        f"test {n_test}; data path {args.data}")

    preprocess_s = 0.0
    y_train = torch.from_numpy(train_labels.astype(np.int64))
    y_test = torch.from_numpy(test_labels.astype(np.int64))
    if args.data == "precompute":
        t0 = time.time()
        u8_train = precompute(train_images, args.size)
        u8_test = precompute(test_images, args.size)
        preprocess_s = time.time() - t0
        log(f"precomputed {n_train + n_test} resized images in {preprocess_s:.1f}s")
        norm = Normalizer()
        # self-check: the batched conversion equals the per-image torchvision pipeline
        ref = tensor_transform()(resize_transform(args.size)(Image.fromarray(test_images[0])))
        assert torch.equal(norm(u8_test[:1])[0], ref), "precomputed path differs from the torchvision pipeline"
    else:
        train_ds = FashionDataset(train_images, train_labels, args.size, train=True)
        test_ds = FashionDataset(test_images, test_labels, args.size, train=False)

    # model
    model = build_model(args.mode, args.lora_r, args.lora_alpha, args.lora_dropout, args.train_bn_affine)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    log(f"mode {args.mode}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = math.ceil(n_train / args.batch)
    total_steps = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=args.pct_start)
    loss_fn = nn.CrossEntropyLoss()
    shuffle_gen = torch.Generator().manual_seed(args.seed)
    flip_gen = torch.Generator().manual_seed(args.seed + 1)
    log(f"{steps_per_epoch} steps/epoch, {total_steps} steps, AdamW lr {lr:g} wd {args.weight_decay}, "
        f"OneCycleLR pct_start {args.pct_start}")

    def train_batches():
        if args.data == "loader":
            loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch, shuffle=True, num_workers=0,
                                                 generator=shuffle_gen)
            yield from loader
            return
        perm = torch.randperm(n_train, generator=shuffle_gen)
        for s in range(0, n_train, args.batch):
            idx = perm[s: s + args.batch]
            x = norm(u8_train[idx])
            flip = torch.rand(len(idx), generator=flip_gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            yield x, y_train[idx]

    def test_batches():
        if args.data == "loader":
            yield from torch.utils.data.DataLoader(test_ds, batch_size=args.eval_batch, shuffle=False, num_workers=0)
            return
        for s in range(0, n_test, args.eval_batch):
            yield norm(u8_test[s: s + args.eval_batch]), y_test[s: s + args.eval_batch]

    epochs = []
    step = 0
    train_s = 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.time()
        data_s = 0.0
        loss_sum = correct = seen = n_batches = 0
        it = iter(train_batches())
        while True:
            td = time.time()
            batch = next(it, None)
            data_s += time.time() - td
            if batch is None:
                break
            x, y = batch
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_batches += 1
            loss_sum += loss.item()
            correct += int((logits.detach().argmax(-1) == y).sum())
            seen += len(y)
            if step % args.log_every == 0:
                log(f"epoch {epoch} step {step}/{total_steps} loss {loss_sum / n_batches:.4f} "
                    f"lr {sched.get_last_lr()[0]:.2e} {1000 * (time.time() - t0) / n_batches:.0f} ms/step")
        epoch_s = time.time() - t0
        train_s += epoch_s
        epochs.append(dict(epoch=epoch, seconds=epoch_s, steps=n_batches, data_seconds=data_s,
                           train_loss=loss_sum / n_batches, train_accuracy=correct / seen))
        log(f"epoch {epoch}: {epoch_s:.1f}s ({1000 * epoch_s / n_batches:.0f} ms/step, data {data_s:.1f}s), "
            f"loss {loss_sum / n_batches:.4f}, train acc {correct / seen:.4f}")

    t0 = time.time()
    test_acc, n_eval = evaluate(model, test_batches())
    eval_s = time.time() - t0
    log(f"test accuracy {test_acc:.4f} on {n_eval} images (eval {eval_s:.1f}s)")

    # artefact sizes
    tmp = None
    save_dir = args.save_dir
    if save_dir is None:
        tmp = tempfile.TemporaryDirectory()
        save_dir = Path(tmp.name)
    save_dir.mkdir(parents=True, exist_ok=True)
    if args.mode == "lora":
        adapter_path = save_dir / "adapter"
        model.save_pretrained(adapter_path)
        readme = adapter_path / "README.md"
        if readme.exists():
            readme.unlink()
        adapter_bytes = dir_size(adapter_path)
        adapter_what = "peft save_pretrained folder (adapter_config.json + adapter_model.safetensors)"
    else:
        adapter_path = save_dir / "trainable.safetensors"
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, adapter_path)
        adapter_bytes = adapter_path.stat().st_size
        adapter_what = "trainable parameters as one safetensors file"
    bn_path = save_dir / "bn_running_stats.safetensors"
    save_file(bn_buffers(model), bn_path)
    bn_bytes = bn_path.stat().st_size
    if tmp is not None:
        tmp.cleanup()

    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?") \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    record = dict(
        benchmark="vision_reference",
        mode=args.mode,
        test_accuracy=test_acc,
        test_images=n_eval,
        train_images=n_train,
        trainable_params=trainable,
        total_params=total,
        total_params_note="parameters of the model as trained (lora: base + LoRA + the classifier twice, "
                          "peft keeps the frozen original beside its modules_to_save copy)",
        train_seconds=train_s,
        time_per_step_ms=1000 * train_s / max(step, 1),
        steps=step,
        eval_seconds=eval_s,
        preprocess_seconds=preprocess_s,
        data_path=args.data,
        data_seconds_in_training=sum(e["data_seconds"] for e in epochs),
        peak_rss_mb=peak_rss_kb / 1024,
        adapter_bytes=adapter_bytes,
        adapter_what=adapter_what,
        bn_running_stats_bytes=bn_bytes,
        bn_note="training in train() mode changes every BatchNorm's running statistics; the test accuracy "
                "uses them, and neither the adapter nor trainable.safetensors contains them",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        versions=dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                      peft=peft.__version__, safetensors=safetensors.__version__, numpy=np.__version__),
        machine=dict(cpu=cpu, logical_cpus=os.cpu_count(), loadavg_at_start=loadavg_at_start,
                     loadavg_at_end=os.getloadavg(),
                     note="shared cores: other processes (e.g. cargo builds) inflate the timings"),
        setup=dict(model="torchvision mobilenet_v2 IMAGENET1K_V1", head="Dropout(0.2) + Linear(1280, 10)",
                   size=args.size, batch=args.batch, epochs=args.epochs, optimizer="AdamW", lr=lr,
                   weight_decay=args.weight_decay, schedule="OneCycleLR (torch defaults, cycle_momentum=True)",
                   pct_start=args.pct_start, total_steps=total_steps, augmentation="RandomHorizontalFlip(0.5)",
                   normalize=dict(mean=MEAN, std=STD), train_limit=args.train_limit, test_limit=args.test_limit,
                   seed=args.seed, bn="train() during training: batch statistics, running stats updated",
                   lora=dict(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=LORA_REGEX, modules_to_save=["classifier"],
                             train_bn_affine=args.train_bn_affine) if args.mode == "lora"
                   else None),
        trainable_param_names=trainable_names if len(trainable_names) <= 400 else f"{len(trainable_names)} tensors",
        epochs=epochs,
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        total_seconds=time.time() - started,
    )
    text = json.dumps(record, indent=2)
    summary = {k: record[k] for k in ("mode", "test_accuracy", "trainable_params", "total_params", "train_seconds",
                                      "time_per_step_ms", "eval_seconds", "preprocess_seconds", "peak_rss_mb",
                                      "adapter_bytes", "torch", "threads")}
    print(json.dumps(summary, indent=2), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
