#!/usr/bin/env bash
# Prepare this checkout for a run of scripts/gpu/check.sh or train.sh on a GPU machine lent through this workplace's
# `device` tool, and undo it afterwards:
#
#   scripts/gpu/pack.sh              # before the device run
#   (device tool) run  command: "bash scripts/gpu/check.sh" (or train.sh)   carry: [".gpu"]   timeout_s: 540
#   scripts/gpu/pack.sh --restore    # after it
#
# The device image has torch, numpy, scipy, einops, tqdm and matplotlib but not SimpleITK or MONAI, reaches no
# package index, and gets neither ../shared/data nor anything outside the checkout. This script downloads the two
# packages' wheels (the versions of this project's environment), unpacks them and packs them with xz into
# .gpu/site.tar.xz (28 MiB; the wheels are 54 MB), and copies the abdomen data (the BTCV label maps and the example
# CT, 5.6 MB) into .gpu/data; env.sh uses both there. The tool sends the tracked tree too (42 MiB) and at most 64 MiB
# in all, so the two benchmark baselines' weights (benchmarks/baselines/*.pt, 16.6 MB, not used there) are taken out
# of git's index meanwhile: the files stay in the working tree, untracked and ignored, until --restore puts them back
# in the index. Do not commit in between.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
exclude=.git/info/exclude
mark="# textscf scripts/gpu/pack.sh: baselines set aside"
aside="/benchmarks/baselines/*.pt"
data=${TEXTSCF_SHARED_DATA:-$root/../shared/data}

if [ "${1:-}" = "--restore" ]; then
  git reset -q HEAD -- benchmarks/baselines
  if [ -f "$exclude" ]; then
    { grep -v -x -F -e "$mark" -e "$aside" "$exclude" || true; } > "$exclude.part"
    mv "$exclude.part" "$exclude"
  fi
  git status --short benchmarks/baselines
  echo "pack.sh: the baselines are back in the index"
  exit 0
fi

grep -qx "/.gpu/" "$exclude" 2>/dev/null || echo "/.gpu/" >> "$exclude"
mkdir -p .gpu
if [ ! -f .gpu/site.tar.xz ]; then
  versions=$(scripts/with-env python -c \
    "import importlib.metadata as m; print(m.version('SimpleITK'), m.version('monai'))")
  read -r sitk_version monai_version <<< "$versions"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  env -u PIP_FIND_LINKS python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$work/wheels" \
    "SimpleITK==$sitk_version" "monai==$monai_version"
  mkdir -p "$work/site"
  for wheel in "$work"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$work/site"; done
  tar -cJf .gpu/site.tar.xz.part -C "$work/site" .
  mv .gpu/site.tar.xz.part .gpu/site.tar.xz
fi
if [ -d "$data/abdomen" ]; then
  [ -d .gpu/data ] && chmod -R u+w .gpu/data && rm -rf .gpu/data
  mkdir -p .gpu/data
  cp -r "$data/abdomen" .gpu/data/
  [ -f "$data/README.md" ] && cp "$data/README.md" .gpu/data/
  chmod -R u+w .gpu/data  # the shared copy may be read-only; this one is replaced on the next run
else
  echo "pack.sh: no $data/abdomen (set TEXTSCF_SHARED_DATA): train.sh will have no data there" >&2
fi
if git ls-files --error-unmatch benchmarks/baselines/*.pt >/dev/null 2>&1; then
  git rm -q --cached benchmarks/baselines/*.pt
  printf '%s\n%s\n' "$mark" "$aside" >> "$exclude"
fi
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carried=$(du -sb .gpu | cut -f1)
echo "pack.sh: tracked tree $((tracked / 1048576)) MiB + .gpu $((carried / 1048576)) MiB (the limit is 64 MiB)."
echo "pack.sh: run 'bash scripts/gpu/check.sh' or 'bash scripts/gpu/train.sh' there with carry [\".gpu\"], then" \
  "'scripts/gpu/pack.sh --restore'."
