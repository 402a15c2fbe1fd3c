#!/usr/bin/env bash
# Prepares the ignored folder official/ (repository root) that benchmarks/gpu/run.sh compares against:
#   official/refs/NVlabs+FasterViT/  official/refs/cheerss+CrossFormer/  official/refs/hkzhang91+CabViT/
#       the trees of the three public repositories at their HEAD (never committed: /official/ is ignored)
#   official/wheels/   einops (the official CabViT imports it) and kornia + kornia_rs for the GPU machine,
#                      used where they are not installed
#   official/tools/official.py + officialshim/
#       the importer of the project's shared tools (shared/tools/official): builds the official models;
#       the shim supplies the old-timm names their code imports where timm is not installed
#
# Usage: benchmarks/gpu/prepare_official.sh [MIRRORS] [TOOLS]
#   MIRRORS  a folder holding <owner>+<name>/repo git directories (what the session `fetch` tool makes,
#            /work/.mirror by default); a repository missing there is cloned from GitHub (needs network)
#   TOOLS    the shared official tools (default: $HV_OFFICIAL_TOOLS, else /work/shared/tools/official)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
mirrors="${1:-/work/.mirror}"
tools="${2:-${HV_OFFICIAL_TOOLS:-/work/shared/tools/official}}"
dest="$root/official"
mkdir -p "$dest/refs" "$dest/tools"
for repo in NVlabs/FasterViT cheerss/CrossFormer hkzhang91/CabViT; do
    name="${repo/\//+}"
    out="$dest/refs/$name"
    rm -rf "$out" && mkdir -p "$out"
    if [ -d "$mirrors/$name/repo" ]; then
        git --git-dir="$mirrors/$name/repo" archive HEAD | tar -x -C "$out"
        rev=$(git --git-dir="$mirrors/$name/repo" rev-parse HEAD)
    else
        tmp=$(mktemp -d)
        git clone --quiet --depth 1 "https://github.com/$repo" "$tmp/src"
        git -C "$tmp/src" archive HEAD | tar -x -C "$out"
        rev=$(git -C "$tmp/src" rev-parse HEAD)
        rm -rf "$tmp"
    fi
    echo "$repo $rev" >> "$dest/refs/REVISIONS.tmp"
    # the benchmarks import the model files only: drop notebooks, images and pretrained files they carry
    find "$out" -type f \( -name '*.ipynb' -o -name '*.png' -o -name '*.jpg' -o -name '*.gif' -o -name '*.pdf' \
        -o -name '*.pth' -o -name '*.pth.tar' -o -name '*.onnx' -o -name '*.engine' \) -delete
done
mv "$dest/refs/REVISIONS.tmp" "$dest/refs/REVISIONS"
if [ ! -f "$tools/official.py" ]; then
    echo "prepare_official.sh: $tools/official.py not found (pass the shared tools folder as the 2nd argument)" >&2
    exit 1
fi
# einops (pure Python), which the official CabViT imports: a wheel, put on sys.path by gpu_check.py where
# the machine has no einops
py="${PYTHON:-$(command -v python3 || command -v python)}"
rm -rf "$dest/wheels" && mkdir -p "$dest/wheels"
"$py" -m pip download --quiet --no-deps -d "$dest/wheels" "einops==0.8.2"
# kornia (hybridvit's GPU augmentation in `hybridvit train`), absent from the GPU machine's image (Python 3.12,
# no network there): run.sh installs these into a temporary folder where kornia is missing
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest/wheels" "kornia==0.9.0" "kornia_rs==0.2.0"
rm -rf "$dest/tools" && mkdir -p "$dest/tools"
cp "$tools/official.py" "$dest/tools/"
cp -r "$tools/officialshim" "$dest/tools/"
find "$dest/tools" -name __pycache__ -prune -exec rm -rf {} +
echo "official/ ready ($(du -sh "$dest" | cut -f1)):"
cat "$dest/REVISIONS" 2>/dev/null || cat "$dest/refs/REVISIONS"
