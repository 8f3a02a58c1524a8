#!/usr/bin/env bash
# Prepare this checkout for benchmarks/gpu_run.sh on a lent GPU machine (the workplace's `device` tool), and undo it.
#
#   benchmarks/gpu_pack.sh            # before the device run
#   (device tool) run  command: "bash benchmarks/gpu_run.sh"   carry: [".gpu"]   timeout_s: 540
#   benchmarks/gpu_pack.sh --restore  # after it
#
# The device image has torch, numpy, scipy, einops, tqdm and matplotlib but not SimpleITK or MONAI, and it reaches
# no package index. This script downloads their wheels (the versions of this project's environment), unpacks them and
# packs them with xz into .gpu/site.tar.xz (about 32 MB; the wheels are 54 MB), which gpu_run.sh unpacks there.
# The tool sends the tracked tree too (44 MB) and at most 64 MiB in all, so the two benchmark baselines' weights
# (benchmarks/baselines/*.pt, 16.6 MB, not used by the GPU run) are taken out of git's index while the run is
# prepared: the files stay in the working tree, untracked and ignored, until --restore puts them back in the index.
# Do not commit in between.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
exclude=.git/info/exclude
aside=benchmarks/baselines/*.pt
mark="# textscf gpu_pack.sh: baselines set aside"

if [ "${1:-}" = "--restore" ]; then
  git reset -q HEAD -- benchmarks/baselines
  sed -i "/^$mark\$/,+1d" "$exclude"
  git status --short benchmarks/baselines
  echo "gpu_pack: baselines back in the index"
  exit 0
fi

grep -qx "/.gpu/" "$exclude" 2>/dev/null || echo "/.gpu/" >> "$exclude"
if [ ! -f .gpu/site.tar.xz ]; then
  versions=$(scripts/with-env python -c \
    "import importlib.metadata as m; print(m.version('SimpleITK'), m.version('monai'))")
  read -r sitk_version monai_version <<< "$versions"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  env -u PIP_FIND_LINKS python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$work/wheels" \
    "SimpleITK==$sitk_version" "monai==$monai_version"
  mkdir -p "$work/site" .gpu
  for wheel in "$work"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$work/site"; done
  tar -cJf .gpu/site.tar.xz.part -C "$work/site" .
  mv .gpu/site.tar.xz.part .gpu/site.tar.xz
fi
if git ls-files --error-unmatch $aside >/dev/null 2>&1; then
  git rm -q --cached $aside
  printf '%s\n%s\n' "$mark" "/benchmarks/baselines/*.pt" >> "$exclude"
fi
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
packed=$(du -b .gpu/site.tar.xz | cut -f1)
echo "gpu_pack: tracked tree $((tracked / 1048576)) MiB + .gpu $((packed / 1048576)) MiB (limit 64 MiB)."
echo "gpu_pack: now run 'bash benchmarks/gpu_run.sh' with carry [\".gpu\"], then 'benchmarks/gpu_pack.sh --restore'."
