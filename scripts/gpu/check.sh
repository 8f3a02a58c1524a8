#!/usr/bin/env bash
# Issue 11's GPU checks in one command, from the repository root of a machine with a CUDA GPU (pack.sh prepares
# this workplace's lent machine). Results go to $OUT (default ./gpu-results), 6 files:
#   versions.txt                  the GPU, driver and package versions;
#   inference.{md,json}           model_efficiency.py --inference on the GPU: eager vs the inference path, the
#                                 reference-head model at 160x192x224 and the bundled model, with peak GPU memory;
#   pipeline.{md,json}            pipeline_resources.py on the GPU, end to end (random-init SwinUNETR segmentation,
#                                 network, outputs) for the 192x160x256 abdomen phantom pair at 2 mm, the network on
#                                 the full grid (the worst case): time, RSS and GPU memory per stage;
#   pipeline_bundled_grid.md      the same with the network on a 48x48x64 grid, the bundled model's size.
# TEXTSCF_DEVICE=cpu runs the same on the CPU and TEXTSCF_QUICK=1 on tiny grids (the script's own test does both).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/gpu/env.sh
out=${OUT:-gpu-results}
mkdir -p "$out"
efficiency=(--inference --device "$device" --repeats 5 --inference-threads "$threads")
pipeline=(--device "$device" --segmentor --refine-iterations 1 --threads "$threads")
bundled_grid=(--model-shape 48,48,64)
if [ -n "${TEXTSCF_QUICK:-}" ]; then
  efficiency+=(--shape 32,32,48 --repeats 1)
  pipeline+=(--shape 32,32,32 --spacing 4,4,4 --segmentor-feature-size 12)
  bundled_grid=(--model-shape 16,16,16)
fi
versions "$out/versions.txt" || exit 1
status=0
"$py" benchmarks/model_efficiency.py "${efficiency[@]}" --json "$out/inference.json" 2>&1 \
  | tee "$out/inference.md" || status=1
"$py" benchmarks/pipeline_resources.py "${pipeline[@]}" --json "$out/pipeline.json" 2>&1 \
  | tee "$out/pipeline.md" || status=1
"$py" benchmarks/pipeline_resources.py "${pipeline[@]}" "${bundled_grid[@]}" 2>&1 \
  | tee "$out/pipeline_bundled_grid.md" || status=1
exit $status
