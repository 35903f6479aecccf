#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what benchmarks/device_check.sh installs on a lent GPU machine,
# which has Python 3.12 and torch but no network: the project's own wheel and the Python 3.12
# wheels of the packages that machine lacks, at the versions uv.lock pins. Run here, in a checkout
# with a package index reachable (PyPI or its mirror):
#
#     bash benchmarks/device_wheels.sh [mobile_sam.pt]
#
# MobileSAM's weights go along as .whl/mobile_sam.pt (device_check.sh's default checkpoint): the
# file given, else the acquire stage's data/raw/mobile_sam/mobile_sam.pt, else the tests' cache
# ($SUM_CACHE_DIR or ~/.cache/sum, mobile_sam/mobile_sam.pt), checked against the sha256 in
# params/model/mobile_sam.yaml; without any, MobileSAM runs there with random weights.
#
# The GPU machine's image already holds torch, torchvision, numpy, opencv, pillow, timm, scipy,
# tqdm, pyyaml, pytest (see the device notes); these are missing there:
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
# binary wheels for CPython 3.12 / manylinux x86-64, and pure-Python ones
BINARY=(segment-anything hydra-core omegaconf pycocotools)
# published as source only: built here into pure-Python wheels
SOURCE=(antlr4-python3-runtime mobilesam-mirror)

locked() {  # the version uv.lock pins for package $1
    "$PY" - "$1" <<'EOF'
import sys, tomllib
lock = tomllib.load(open("uv.lock", "rb"))
print(next(p["version"] for p in lock["package"] if p["name"] == sys.argv[1]))
EOF
}

rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
"$PY" -m pip wheel -q --no-deps -w "$DEST.tmp" .
for name in "${SOURCE[@]}"; do
    "$PY" -m pip wheel -q --no-deps -w "$DEST.tmp" "$name==$(locked "$name")"
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
for name in "${BINARY[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$DEST.tmp" "$name==$(locked "$name")"
done
CACHE=${SUM_CACHE_DIR:-$HOME/.cache/sum}
for ckpt in "${1:-}" data/raw/mobile_sam/mobile_sam.pt "$CACHE/mobile_sam/mobile_sam.pt"; do
    [ -n "$ckpt" ] && [ -f "$ckpt" ] || continue
    want=$(sed -n 's/^checkpoint_sha256: *\([0-9a-f]*\).*/\1/p' params/model/mobile_sam.yaml)
    got=$(sha256sum "$ckpt" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
        echo "device_wheels.sh: $ckpt: sha256 $got, params/model/mobile_sam.yaml says $want" >&2
        exit 1
    fi
    cp "$ckpt" "$DEST.tmp/mobile_sam.pt"
    break
done
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
ls -l "$DEST"
