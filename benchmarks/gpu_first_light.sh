#!/usr/bin/env bash
# GPU first light for xbmd-batch: one prepared run on a CUDA box (target: <= 7 min on 16 cores + one H100/H200).
#
#   OUT=/results bash benchmarks/gpu_first_light.sh            # the run
#   OUT=/tmp/x  bash benchmarks/gpu_first_light.sh --dry-run   # print the plan, check the CPU parts (CI runs this)
#
# Everything goes under $OUT: first_light.log, steps.jsonl, summary.json, summary.md, gpu_util.csv,
# junit_gpu.xml, artifacts.tgz; scratch (site-packages, cohort, models, engines, bench folders) under $OUT/work,
# deleted at the end unless KEEP_WORK=1 (its small files are packed into artifacts.tgz first).
#
# Environment (all optional):
#   PYTHON=python3            interpreter that has torch (a CUDA build); nothing is installed over it
#   WHEELHOUSE=DIR            wheels for what that python lacks, installed with --no-index into $OUT/work/site:
#                             pydicom, polars, polars-runtime-32 (required) and pylibjpeg + pylibjpeg-openjpeg (the
#                             J2K cases of pytest -m gpu need them), optionally onnxruntime-gpu / tensorrt*.
#                             Build it on a connected machine: see docs/gpu.md ("Offline GPU box: a wheelhouse").
#                             On this workplace's H200 box (64 MiB carry for tree + wheels, no index): put exactly
#                             these cp312 wheels in /work/main/.whl (ignored by git; pip download --no-deps, sizes
#                             measured 2026-11-30): pydicom-3.0.2 (2.4 MB), polars-2.1.0 (0.9 MB),
#                             polars_runtime_32-2.1.0 (53.9 MB), pylibjpeg-2.1.0 (0.03 MB),
#                             pylibjpeg_openjpeg-2.6.0 cp312 manylinux (2.0 MB) = 59.2 MB (56.4 MiB); with the
#                             ~2.5 MB tracked tree ~59 MiB of 64 MiB. onnxruntime-gpu (~255 MB) / TensorRT do not fit.
#   PIP_NO_INDEX=1            never reach a package index (set this on boxes without one)
#   FIRST_LIGHT_BUDGET_S=450  wall-clock budget; a step that does not fit in what is left is skipped, not started
#   FIRST_LIGHT_DEVICE=cuda   "cpu" runs the same steps on a CPU box (fp32, torch + onnxruntime) to check the script
#   COHORT_N=256 COHORT_SIZE=2000 MODEL_SIZE=224 BATCHES="128" PRECISIONS="fp16" E2E_BATCH=128
#                             (the 2026-11-29 H200 run measured fp32/fp16/bf16 x 32/128/256; BATCHES="32 128 256"
#                             PRECISIONS="fp32 fp16 bf16" repeats that)
#   STEADY_N=1024 STEADY_ROUNDS=2  steady state: a second SYNTHETIC cohort of STEADY_N images, scored end to end
#                             (torch fp16, batch E2E_BATCH) with --preprocess-device cpu then cuda, STEADY_ROUNDS times
#                             back to back, GPU utilisation sampled; STEADY_N=0 skips it
#   STEADY_PAGEABLE=1         round 1 also runs cuda with XBMD_PIN_SLOTS=0 (slots not page-locked): what pinning buys
#
# Exit code: 0 when every mandatory step passed (env, facts, cohort, model, export, pytest_gpu, and bench for each
# backend that is installed); 1 otherwise; 2 bad usage. Optional steps (pins venv, GPU package installs) are
# recorded as skipped or failed without failing the run.
set -uo pipefail

usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -z "${OUT:-}" ]]; then echo "set OUT to the output folder" >&2; exit 2; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${FIRST_LIGHT_BUDGET_S:-450}
COHORT_N=${COHORT_N:-256}
COHORT_SIZE=${COHORT_SIZE:-2000}
MODEL_SIZE=${MODEL_SIZE:-224}
BATCHES=${BATCHES:-"128"}
PRECISIONS=${PRECISIONS:-"fp16"}
E2E_BATCH=${E2E_BATCH:-128}
STEADY_N=${STEADY_N:-1024}
STEADY_ROUNDS=${STEADY_ROUNDS:-2}
STEADY_PAGEABLE=${STEADY_PAGEABLE:-1}
DEVICE=${FIRST_LIGHT_DEVICE:-cuda}
COHORT_J2K=${COHORT_J2K:-0}
NPROC=$(nproc 2>/dev/null || echo 4)
WORKERS=${WORKERS:-$(( NPROC > 2 ? NPROC - 1 : 1 ))}  # one core for the scoring process itself
mkdir -p "$OUT/work"
OUT=$(cd "$OUT" && pwd)
WORK=$OUT/work
LOG=$OUT/first_light.log
STEPS=$OUT/steps.jsonl
SITE=$WORK/site
HELPER="$ROOT/benchmarks/gpu_first_light.py"
: > "$STEPS"
: > "$LOG"
T0=$SECONDS
FAILED=()
SAMPLER_PID=""

export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XBMD_ENGINE_CACHE="$WORK/engines"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

log() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
json_str() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/ }; printf '"%s"' "$s"; }
record() {  # step status start end note
  printf '{"step":%s,"status":%s,"start":%s,"end":%s,"seconds":%s,"note":%s}\n' \
    "$(json_str "$1")" "$(json_str "$2")" "$3" "$4" \
    "$(awk -v a="$3" -v b="$4" 'BEGIN{printf "%.2f", b-a}')" "$(json_str "${5:-}")" >> "$STEPS"
}
now() { date +%s.%N; }
left() { echo $(( BUDGET_S - (SECONDS - T0) )); }

# run_step NAME MANDATORY(0/1) EST_SECONDS CMD...: runs CMD with a timeout of what is left, logs, records.
run_step() {
  local name=$1 mandatory=$2 est=$3; shift 3
  local remaining; remaining=$(left)
  if (( remaining < est )); then
    log "SKIP $name: ${remaining}s left, needs ~${est}s"
    record "$name" skipped "$(now)" "$(now)" "budget: ${remaining}s left, step needs ~${est}s"
    (( mandatory )) && FAILED+=("$name(skipped)")
    return 0
  fi
  local cap=$(( 2 * est > 60 ? 2 * est : 60 ))  # one slow step must not eat the others' budget
  (( cap < remaining )) && remaining=$cap
  log "RUN  $name (limit ${remaining}s): $*"
  local start end rc
  start=$(now)
  # `timeout` runs programs, not shell functions: functions go through `bash -c` (they and the variables they
  # read are exported below)
  if declare -F "$1" >/dev/null; then
    timeout --kill-after=10 "$remaining" bash -c '"$@"' _ "$@" >> "$LOG" 2>&1
  else
    timeout --kill-after=10 "$remaining" "$@" >> "$LOG" 2>&1
  fi
  rc=$?
  end=$(now)
  if (( rc == 0 )); then
    record "$name" ok "$start" "$end" ""
    log "OK   $name"
  else
    record "$name" failed "$start" "$end" "exit $rc$([[ $rc == 124 ]] && echo ' (timeout)')"
    log "FAIL $name (exit $rc)"
    (( mandatory )) && FAILED+=("$name")
  fi
  return 0
}
skip_step() { record "$1" skipped "$(now)" "$(now)" "$2"; log "SKIP $1: $2"; }

has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }
cuda_ok() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
ort_cuda_ok() {
  "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" \
    >/dev/null 2>&1
}

dist_of() {  # import name -> pip distribution(s) the project needs at run time
  case "$1" in
    polars) echo "polars polars-runtime-32" ;;
    PIL) echo pillow ;;
    *) echo "$1" ;;
  esac
}

pip_install_target() {  # DEST DIST... : from the wheelhouse when given, else the index (unless PIP_NO_INDEX)
  local dest=$1; shift
  if [[ -n "${WHEELHOUSE:-}" ]]; then
    "$PY" -m pip install -q --no-deps --no-index --find-links "$WHEELHOUSE" --no-compile --target "$dest" "$@"
  elif [[ -z "${PIP_NO_INDEX:-}" ]]; then
    "$PY" -m pip install -q --no-deps --no-compile --target "$dest" "$@"
  else
    echo "no WHEELHOUSE and PIP_NO_INDEX is set: cannot install $*"
    return 1
  fi
}

env_step() {
  mkdir -p "$SITE"
  local missing=()
  for mod in numpy torch torchvision pydicom polars pyarrow typer rich onnx PIL psutil pytest filelock; do
    has_module "$mod" || missing+=("$mod")
  done
  if [[ " ${missing[*]} " == *" torch "* ]]; then
    echo "python $PY has no torch: install a CUDA build first (README), or set PYTHON"
    return 1
  fi
  if (( ${#missing[@]} )); then
    local dists=()
    for m in "${missing[@]}"; do read -r -a d <<< "$(dist_of "$m")"; dists+=("${d[@]}"); done
    echo "missing: ${missing[*]} -> installing ${dists[*]} into $SITE"
    pip_install_target "$SITE" "${dists[@]}" || return 1
  fi
  # JPEG 2000 encode/decode for the J2K cases of pytest -m gpu (the conftest cohort has J2K files); the bench
  # cohorts stay uncompressed (COHORT_J2K) so their rows compare with the 2026-11-29 run
  if ! has_module pylibjpeg || ! has_module openjpeg; then
    pip_install_target "$SITE" pylibjpeg pylibjpeg-openjpeg \
      || echo "WARNING: pylibjpeg / pylibjpeg-openjpeg not installable (not in WHEELHOUSE?): the J2K tests of pytest_gpu will error"
  fi
  "$PY" -c "import xbmd_batch.cli, export.onnx_export; print('project importable from', xbmd_batch.cli.__file__)"
}

gpu_pkgs_step() {  # optional: onnxruntime-gpu and tensorrt when absent (never over the image's own packages)
  local rc=0
  if ! ort_cuda_ok; then
    mkdir -p "$WORK/ortgpu"
    if pip_install_target "$WORK/ortgpu" onnxruntime-gpu==1.31.1 coloredlogs humanfriendly flatbuffers sympy \
      && PYTHONPATH="$WORK/ortgpu:$PYTHONPATH" "$PY" -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()"; then
      echo "onnxruntime-gpu installed in $WORK/ortgpu"
      echo "$WORK/ortgpu" > "$WORK/ortgpu.path"
    else
      echo "onnxruntime-gpu not available here (no index / not in the wheelhouse): the onnxruntime-CUDA backend is skipped"
      rc=1
    fi
  fi
  if ! has_module tensorrt; then
    if [[ -n "${WHEELHOUSE:-}" ]] && ls "$WHEELHOUSE"/tensorrt* >/dev/null 2>&1; then
      pip_install_target "$SITE" "$WHEELHOUSE"/tensorrt*.whl || rc=1
    elif [[ -z "${PIP_NO_INDEX:-}" ]]; then
      "$PY" -m pip install -q --no-compile --target "$WORK/trt" --extra-index-url https://pypi.nvidia.com \
        'tensorrt-cu13>=10,<12' && echo "$WORK/trt" > "$WORK/trt.path" || rc=1
    else
      echo "tensorrt not installable here (no index, no tensorrt wheels): the TensorRT backend is skipped"
      rc=1
    fi
  fi
  return $rc
}

pins_step() {  # the GPU extra's pins (requirements/gpu-pins.txt) in a small venv without torch: fp16 + IR checks
  "$PY" -m venv "$WORK/pins" || return 1
  if [[ -n "${WHEELHOUSE:-}" ]]; then
    "$WORK/pins/bin/pip" install -q --no-index --find-links "$WHEELHOUSE" -r "$ROOT/requirements/gpu-pins.txt" || return 1
  else
    "$WORK/pins/bin/pip" install -q -r "$ROOT/requirements/gpu-pins.txt" || return 1
  fi
  local model=()
  [[ -f $WORK/model.onnx ]] && model=(--model "$WORK/model.onnx")
  PYTHONPATH="$ROOT" "$WORK/pins/bin/python" "$ROOT/tests/fp16_pins_probe.py" "${model[@]}"
}

steady_call() {  # NAME PREP: score the steady cohort end to end (torch fp16, batch E2E_BATCH) -> work/steady/NAME
  "$PY" -m xbmd_batch score "$WORK/steady_cohort/dicom" "$WORK/steady_cohort/meta.csv" -m "$WORK/model.pt" \
    --backend torch --device "$DEVICE" --precision "$STEADY_PRECISION" -b "$E2E_BATCH" --workers "$WORKERS" \
    --preprocess-device "$2" --max-missing 1 -o "$WORK/steady/$1" -q  # throughput only: any META will do
}

bench_call() {  # NAME PRECISION BATCH E2E(0/1) BACKEND...   (env PREP: --preprocess-device, default cpu)
  local name=$1 prec=$2 b=$3 e2e=$4; shift 4
  local args=()
  for be in "$@"; do args+=(--backend "$be"); done
  local models=(-m "$WORK/model.onnx")
  [[ $prec == fp16 && -f $WORK/model.fp16.onnx ]] && models+=(-m "$WORK/model.fp16.onnx")
  models+=(-m "$WORK/model.pt")
  (( e2e )) || args+=(--no-e2e)
  "$PY" -m xbmd_batch bench "$WORK/cohort/dicom" "$WORK/cohort/meta.csv" "${models[@]}" "${args[@]}" \
    --device "$DEVICE" --precision "$prec" -b "$b" --workers "$WORKERS" --preprocess-device "${PREP:-cpu}" \
    -o "$WORK/bench/$name"
}

backends_for() {  # PRECISION -> the backends that can run it here
  local prec=$1 out=(torch)
  if [[ $DEVICE == cpu ]]; then [[ $prec == fp32 ]] && echo "torch onnxruntime"; return 0; fi
  if [[ $prec != bf16 ]]; then
    [[ -f $WORK/ortgpu.path ]] || ort_cuda_ok && out+=(onnxruntime)
    has_module tensorrt && out+=(tensorrt)
  fi
  echo "${out[@]}"
}

STEADY_PRECISION=$([[ $DEVICE == cuda ]] && echo fp16 || echo fp32)
export ROOT PY WORK SITE DEVICE WORKERS WHEELHOUSE PIP_NO_INDEX E2E_BATCH STEADY_PRECISION
export -f dist_of has_module cuda_ok ort_cuda_ok pip_install_target env_step gpu_pkgs_step pins_step bench_call \
  steady_call

print_plan() {
  cat <<EOF
xbmd-batch GPU first light: plan (budget ${BUDGET_S}s, ${NPROC} cores, ${WORKERS} decode workers)
  python:      $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo 'not found'))
  wheelhouse:  ${WHEELHOUSE:-none}  (PIP_NO_INDEX=${PIP_NO_INDEX:-unset})
  out:         $OUT
  1. facts       nvidia-smi, torch/CUDA, onnxruntime providers, TensorRT -> work/facts.json
  2. env         import check; missing runtime packages from the wheelhouse/index into work/site (no venv over torch)
  3. gpu_pkgs    optional: onnxruntime-gpu 1.31.1 / tensorrt when absent
  4. doctor      python -m xbmd_batch doctor --json
  5. pytest_gpu  pytest -m gpu (junit_gpu.xml); must not skip on a CUDA box
  6. fp16_tests  pytest tests/test_onnx_fp16.py + the fp16/IR export tests
  7. cohort      xbmd-batch synth: ${COHORT_N} SYNTHETIC subjects at ${COHORT_SIZE} px (J2K fraction ${COHORT_J2K})
  8. model       random ${MODEL_SIZE}-px checkpoint -> python -m export onnx --fp16 (parity-gated); then the
                 pins venv (requirements/gpu-pins.txt, optional) probes the fp16 conversion of that model
  9. engines     if tensorrt imports: python -m export tensorrt, fp16 and fp32, profile 1/${E2E_BATCH}/256 (build time)
 10. bench       for precision in ${PRECISIONS}; batch in ${BATCHES}: xbmd-batch bench --device cuda per available
                 backend (bf16: torch only), end-to-end at batch ${E2E_BATCH} with --preprocess-device cpu;
                 then fp16 end-to-end at batch ${E2E_BATCH} again with --preprocess-device cuda (workers hand over
                 reduced images, batches finished on the GPU); GPU sampled every 0.25 s
 11. steady      xbmd-batch synth: ${STEADY_N} SYNTHETIC subjects at ${COHORT_SIZE} px (uncompressed); then
                 ${STEADY_ROUNDS} rounds of xbmd-batch score (torch ${STEADY_PRECISION}, -b ${E2E_BATCH}, ${WORKERS}
                 workers) with --preprocess-device cpu, then cuda, back to back (run.json: throughput, where
                 preprocessing ran, page-locking report); round 1 also cuda with the slots pageable
                 (XBMD_PIN_SLOTS=0, STEADY_PAGEABLE=${STEADY_PAGEABLE}); GPU sampled during each
 12. summarize   summary.json / summary.md (SYNTHETIC labels, machine facts), artifacts.tgz
EOF
}

cleanup() {
  [[ -n "$SAMPLER_PID" ]] && kill "$SAMPLER_PID" 2>/dev/null
  return 0
}
trap cleanup EXIT

if (( DRY )); then
  print_plan | tee -a "$LOG"
  ok=1
  command -v "$PY" >/dev/null || { echo "dry-run: $PY not found"; ok=0; }
  "$PY" "$HELPER" --help >/dev/null || { echo "dry-run: helper does not start"; ok=0; }
  "$PY" -c "import xbmd_batch.cli, export.onnx_export" || { echo "dry-run: project not importable"; ok=0; }
  "$PY" -m xbmd_batch bench --help >/dev/null || { echo "dry-run: bench --help failed"; ok=0; }
  [[ "$("$PY" -m xbmd_batch bench --help 2>&1)" == *--preprocess-device* ]] || { echo "dry-run: bench has no --preprocess-device"; ok=0; }
  [[ "$(COLUMNS=200 "$PY" -m xbmd_batch score --help 2>&1)" == *--preprocess-device* ]] || { echo "dry-run: score has no --preprocess-device"; ok=0; }
  if [[ -n "${WHEELHOUSE:-}" ]]; then
    for w in pydicom polars pylibjpeg pylibjpeg_openjpeg; do
      ls "$WHEELHOUSE"/${w}-*.whl >/dev/null 2>&1 || echo "dry-run: WARNING: no ${w} wheel in $WHEELHOUSE"
    done
  fi
  "$PY" -m export tensorrt --help >/dev/null || { echo "dry-run: export tensorrt --help failed"; ok=0; }
  [[ -f "$ROOT/requirements/gpu-pins.txt" && -f "$ROOT/tests/fp16_pins_probe.py" ]] || { echo "dry-run: pins files missing"; ok=0; }
  if [[ -n "${WHEELHOUSE:-}" ]]; then ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1 || { echo "dry-run: no wheels in $WHEELHOUSE"; ok=0; }; fi
  command -v nvidia-smi >/dev/null && echo "dry-run: nvidia-smi present" || echo "dry-run: no nvidia-smi (fine for a dry run)"
  "$PY" "$HELPER" facts "$WORK/facts.json" && "$PY" "$HELPER" summarize "$OUT" >/dev/null || { echo "dry-run: facts/summarize failed"; ok=0; }
  (( ok )) && echo "dry-run: OK (nothing was installed, built or benchmarked)" || echo "dry-run: FAILED"
  (( ok )) && exit 0 || exit 1
fi

print_plan | tee -a "$LOG"
run_step facts 1 10 "$PY" "$HELPER" facts "$WORK/facts.json"
run_step env 1 90 env_step
if [[ $DEVICE == cuda ]] && ! cuda_ok; then log "torch sees no CUDA device: this is not a GPU run"; FAILED+=("no_cuda"); fi
if [[ $DEVICE == cuda ]]; then run_step gpu_pkgs 0 60 gpu_pkgs_step; else skip_step gpu_pkgs "FIRST_LIGHT_DEVICE=cpu"; fi
[[ -f $WORK/ortgpu.path ]] && export PYTHONPATH="$(cat "$WORK/ortgpu.path"):$PYTHONPATH"
[[ -f $WORK/trt.path ]] && export PYTHONPATH="$(cat "$WORK/trt.path"):$PYTHONPATH"
run_step doctor 0 20 bash -c "\"$PY\" -m xbmd_batch doctor --json > \"$WORK/doctor.json\""
run_step pytest_gpu 1 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs --junitxml="$OUT/junit_gpu.xml" "$ROOT/tests"
run_step fp16_tests 1 90 "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/test_onnx_fp16.py" \
  "$ROOT/tests/test_export.py" -k "fp16 or ir_version"
run_step cohort 1 40 "$PY" -m xbmd_batch synth "$WORK/cohort" --n "$COHORT_N" --size "$COHORT_SIZE" --seed 0 \
  --workers "$NPROC" --j2k-fraction "$COHORT_J2K"
run_step model 1 20 "$PY" "$HELPER" make-model "$WORK/model.pt" --size "$MODEL_SIZE"
run_step export 1 90 "$PY" -m export onnx "$WORK/model.pt" --out "$WORK/model.onnx" --fp16 --parity-cohort "$WORK/cohort"
run_step pins_fp16 0 60 pins_step
if has_module tensorrt && cuda_ok; then
  for prec in fp16 fp32; do
    run_step "engine_$prec" 1 150 "$PY" -m export tensorrt "$WORK/model.onnx" --precision "$prec" \
      --opt-batch "$E2E_BATCH" --max-batch 256 --cache-dir "$WORK/engines" --json
  done
else
  skip_step engines "tensorrt not importable or no CUDA: no engine build"
fi

if [[ $DEVICE == cuda ]]; then
  "$PY" "$HELPER" sample-gpu "$OUT/gpu_util.csv" --interval 0.25 >> "$LOG" 2>&1 &
  SAMPLER_PID=$!
fi
for prec in $PRECISIONS; do
  read -r -a bes <<< "$(backends_for "$prec")"
  (( ${#bes[@]} )) || { skip_step "bench_${prec}" "no backend runs $prec on $DEVICE"; continue; }
  for b in $BATCHES; do
    e2e=0; [[ $b == "$E2E_BATCH" ]] && e2e=1
    run_step "bench_${prec}_b${b}" 1 $(( 15 + 20 * e2e * ${#bes[@]} )) bench_call "${prec}_b${b}" "$prec" "$b" "$e2e" "${bes[@]}"
  done
done
if [[ $DEVICE == cuda ]]; then  # on-device preprocessing, end to end, against the fp16 rows above
  read -r -a bes <<< "$(backends_for fp16)"
  PREP=cuda run_step "bench_prepcuda_fp16_b${E2E_BATCH}" 1 $(( 15 + 20 * ${#bes[@]} )) \
    bench_call "prepcuda_fp16_b${E2E_BATCH}" fp16 "$E2E_BATCH" 1 "${bes[@]}"
else
  skip_step "bench_prepcuda" "FIRST_LIGHT_DEVICE=cpu: --preprocess-device cuda needs a GPU"
fi
# steady state: a larger cohort, CPU vs GPU finishing back to back (the 256-image rows above last ~0.3 s of
# scoring each, mostly start-up); synth ran 256 x 2000 px in 5.5 s on the 16-core H200 box (2026-11-29)
if (( STEADY_N > 0 )); then
  run_step steady_cohort 0 $(( 10 + STEADY_N * 5 / 100 )) "$PY" -m xbmd_batch synth "$WORK/steady_cohort" \
    --n "$STEADY_N" --size "$COHORT_SIZE" --seed 1 --workers "$NPROC" --j2k-fraction 0
  for (( r = 1; r <= STEADY_ROUNDS; r++ )); do
    runs=(cpu); [[ $DEVICE == cuda ]] && runs+=(cuda)
    (( r == 1 && STEADY_PAGEABLE )) && [[ $DEVICE == cuda ]] && runs+=(cudapageable)
    for run in "${runs[@]}"; do
      if [[ ! -f $WORK/steady_cohort/meta.csv ]]; then skip_step "steady_${run}_r${r}" "no steady cohort"; continue; fi
      prep=${run%pageable}  # cudapageable: --preprocess-device cuda with the slots not page-locked
      pin=1; [[ $run == cudapageable ]] && pin=0
      XBMD_PIN_SLOTS=$pin run_step "steady_${run}_r${r}" 0 $(( 15 + STEADY_N / 50 )) steady_call "${run}_r${r}" "$prep"
    done
  done
else
  skip_step steady "STEADY_N=0"
fi
[[ -n "$SAMPLER_PID" ]] && kill "$SAMPLER_PID" 2>/dev/null; SAMPLER_PID=""

"$PY" "$HELPER" summarize "$OUT" | tee -a "$LOG"
tar -czf "$OUT/artifacts.tgz" -C "$WORK" --exclude='site' --exclude='ortgpu' --exclude='trt' --exclude='pins' \
  --exclude='*.engine' --exclude='*.onnx' --exclude='*.pt' --exclude='cohort/dicom' --exclude='steady_cohort/dicom' \
  --exclude='*/e2e_*/cache' . \
  2>> "$LOG"
[[ "${KEEP_WORK:-0}" == 1 ]] || rm -rf "$WORK"
log "done in $((SECONDS - T0))s; failed: ${FAILED[*]:-none}"
(( ${#FAILED[@]} == 0 ))
