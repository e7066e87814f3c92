#!/usr/bin/env bash
# Installs Intel MKL's runtime libraries (the `mkl` wheel on PyPI, pinned) into <repo>/.mkl/lib
# and prints the line that makes peft-rs use its f32 GEMM:
#
#   scripts/install-mkl.sh                     # then: export PEFT_RS_MKL=<repo>/.mkl/lib/libmkl_rt.so.2
#   eval "$(scripts/install-mkl.sh --export)"  # the same, exported into this shell
#
# peft-rs never links MKL: it loads libmkl_rt at run time when PEFT_RS_MKL names it, runs it
# sequentially and splits rows over its own threads. Without it every product stays on the
# `gemm` crate. x86-64 Linux only. Idempotent: an existing install is reused.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="2025.2.0"
DEST="$REPO/.mkl"
LIB="$DEST/lib"
# The runtime dispatcher and what it loads for a sequential LP64 sgemm on any x86-64 CPU.
LIBS=(libmkl_rt.so.2 libmkl_core.so.2 libmkl_sequential.so.2 libmkl_intel_lp64.so.2
      libmkl_def.so.2 libmkl_mc3.so.2 libmkl_avx2.so.2 libmkl_avx512.so.2)
if [ "$(uname -sm)" != "Linux x86_64" ]; then
  echo "install-mkl.sh: MKL wheels are for x86-64 Linux; peft-rs uses the gemm crate here" >&2
  exit 1
fi
if [ ! -f "$LIB/.version-$VERSION" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "install-mkl.sh: downloading mkl==$VERSION from PyPI (about 190 MB)" >&2
  python3 -m pip download --quiet --no-deps --dest "$tmp" "mkl==$VERSION" >&2
  mkdir -p "$LIB.partial"
  python3 - "$tmp" "$LIB.partial" "${LIBS[@]}" <<'PY'
import glob, sys, zipfile
src, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]
wheel = zipfile.ZipFile(glob.glob(f"{src}/mkl-*.whl")[0])
members = {m.split("/")[-1]: m for m in wheel.namelist()}
for name in names:
    with open(f"{dest}/{name}", "wb") as f:
        f.write(wheel.read(members[name]))
PY
  touch "$LIB.partial/.version-$VERSION"
  rm -rf "$LIB"
  mv "$LIB.partial" "$LIB"
fi
if [ "${1:-}" = "--export" ]; then
  echo "export PEFT_RS_MKL=$LIB/libmkl_rt.so.2"
else
  echo "MKL $VERSION in $LIB; use it with: export PEFT_RS_MKL=$LIB/libmkl_rt.so.2" >&2
fi
