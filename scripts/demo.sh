#!/usr/bin/env bash
# The README's main job on the embedded synthetic default: synth -> train (quick) -> export ONNX -> score -> report.
# Every number it prints comes from a SYNTHETIC cohort generated here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
PY=.venv/bin/python
XB=.venv/bin/xbmd-batch
N=${XBMD_DEMO_N:-400}
mkdir -p "$OUT"
start=$(date +%s)
step() { printf '\n=== [%ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

step "1/5 synthetic cohort ($N subjects) -> $OUT/cohort"
if [ ! -f "$OUT/cohort/cohort.json" ]; then
  $XB synth "$OUT/cohort" --n "$N" --seed 0 --size 1024 --preview "$OUT/synth_preview.png"
fi

# A rerun retrains, re-exports and rescores from scratch (the cohort is deterministic and kept): a new model
# must not be mixed with the previous run's scores (score would refuse to resume with another model).
rm -rf "$OUT/run" "$OUT/model.onnx" "$OUT/results"

step "2/5 train XAttn-BMD, quick preset, single 90/10 split + final model -> $OUT/run"
$PY -m train --cohort "$OUT/cohort" --preset quick --single-split --final --out "$OUT/run"

step "3/5 export ONNX with parity check -> $OUT/model.onnx"
$PY -m export onnx "$OUT/run/final.pt" --out "$OUT/model.onnx" --parity-cohort "$OUT/cohort"

step "4/5 score the cohort -> $OUT/results"
set +e
$XB score "$OUT/cohort/dicom" "$OUT/cohort/meta.csv" --model "$OUT/model.onnx" --out "$OUT/results"
rc=$?
set -e
step "5/5 cohort report -> $OUT/results/report.html"
$XB report "$OUT/results" --out "$OUT/results/report.html"
step "done (score exit code $rc)"
echo "Outputs (all SYNTHETIC):"
echo "  cohort + preview : $OUT/cohort, $OUT/synth_preview.png"
echo "  training report  : $OUT/run/report.md (plots: $OUT/run/*.png)"
echo "  model            : $OUT/run/final.pt, $OUT/model.onnx"
echo "  scores           : $OUT/results/scores.parquet, cohort_summary.parquet, failures.parquet, run.json"
echo "  report           : $OUT/results/report.html (figures: $OUT/results/report_figures/*.png)"
exit $rc
