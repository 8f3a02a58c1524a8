#!/usr/bin/env bash
# The next stage of the bundled network's recipe on a GPU, in one command (pack.sh prepares this workplace's lent
# machine): a 4 mm stage (96x96x128, the same box as the 8 mm grid) started from the bundled 8 mm weights with stage
# 4's settings (model card abdomen-ct-onehot-ns8-8mm.md), then the 42 abdomen test pairs and the real CT with known
# fields, network alone, for the new weights and for the bundled ones, side by side. Results in $OUT (default
# ./gpu-train), 7 files:
#   versions.txt, train.log, log.csv, last.pt, best.pt          the run and its weights (last.pt of the last epoch);
#   results_new.md, results_bundled.md                          registration_benchmark.py's tables.
# EPOCHS (default 30) x STEPS (default 100) pairs, WORKERS DataLoader workers (default: the cores less two),
# TRAIN_SECONDS (default 420) stops the training early, keeping the last finished epoch. TEXTSCF_DEVICE=cpu and
# TEXTSCF_QUICK=1 (a 32^3 grid at 12 mm, 2 test pairs) run the same here (the script's own test does).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/gpu/env.sh
out=${OUT:-gpu-train}
mkdir -p "$out"
run=$(mktemp -d /tmp/textscf-gpu-train.XXXXXX)
epochs=${EPOCHS:-30}
steps=${STEPS:-100}
workers=${WORKERS:-$(( threads > 3 ? threads - 2 : 1 ))}
grid=(--spacing 4 4 4 --shape 96 96 128)
test_pairs=()
real_ct=(--real-ct --more-real-ct)
if [ -n "${TEXTSCF_QUICK:-}" ]; then
  grid=(--spacing 12 12 12 --shape 32 32 32)
  test_pairs=(--pairs 2)
  real_ct=()
fi
bundled=TextSCFRegistration/textscf/resources/models/abdomen-ct-onehot-ns8-8mm.pt
versions "$out/versions.txt" || exit 1
timeout "${TRAIN_SECONDS:-420}" "$py" -m textscf.cli train --data btcv-synthetic --preset abdomen-ct \
  --encoder onehot --start-channels 8 --hidden-channels 64 --head textscf "${grid[@]}" --synth \
  --intra-fraction 0.3 --random-contrast 0.3 --known-field-mm 24 --field-weight 0.5 --dice-sigmas 0 1.5 3 \
  --smooth-weight 0.15 --init-weights "$bundled" --lr 3e-4 --epochs "$epochs" --steps-per-epoch "$steps" \
  --seed 3 --device "$device" --workers "$workers" --threads "$threads" --quiet -o "$run/stage" 2>&1 \
  | tee "$out/train.log"
[ -f "$run/stage/last.pt" ] || { echo "train.sh: no epoch finished" | tee -a "$out/train.log"; exit 1; }
cp "$run/stage/last.pt" "$run/stage/log.csv" "$out/"
[ -f "$run/stage/best.pt" ] && cp "$run/stage/best.pt" "$out/"
status=0
for which in new bundled; do
  checkpoint=$([ "$which" = new ] && echo "$run/stage/last.pt" || echo "$bundled")
  "$py" benchmarks/registration_benchmark.py --abdomen "${test_pairs[@]}" "${real_ct[@]}" --no-defaults \
    --checkpoint "$checkpoint" --skip-peers "ANTs SyN" "Elastix B-spline" --device "$device" \
    --threads "$threads" -o "$run/bench_$which" > "$run/bench_$which.log" 2>&1 || status=1
  cp "$run/bench_$which/results.md" "$out/results_$which.md" 2>/dev/null || { tail -20 "$run/bench_$which.log"; status=1; }
done
rm -rf "$run"
exit $status
