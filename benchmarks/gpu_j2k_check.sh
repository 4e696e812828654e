#!/usr/bin/env bash
# GPU JPEG 2000 check (issue 11 item 4) for a device box without a package index and a 64 MiB carry per call.
#
# nvImageCodec + nvjpeg2k (28.0 MiB) do not fit next to gpu_first_light's wheelhouse (59.2 MB), so this takes
# two calls on the same warm machine; what the first installs into .gpusite/ (git-ignored) stays there:
#   call 1, carry [".whl"]      : bash benchmarks/gpu_j2k_check.sh base   # pydicom, polars(-runtime-32), pylibjpeg(-openjpeg)
#   call 2, carry [".whl-j2k"]  : bash benchmarks/gpu_j2k_check.sh run    # nvidia-nvimgcodec-cu13, nvidia-nvjpeg2k-cu13
# Wheels (pip download --no-deps, measured 2026-11-30): .whl/ as in benchmarks/gpu_first_light.sh; .whl-j2k/:
#   nvidia_nvimgcodec_cu13-0.9.0.20-py3-none-manylinux_2_28_x86_64.whl (25,044,224 bytes) and
#   nvidia_nvjpeg2k_cu13-0.11.0.51-py3-none-manylinux2014_x86_64.whl (4,269,503 bytes).
# "run" records (under $OUT, else ./gpu_j2k_out): facts (nvImageCodec version, gpu_j2k.status(), doctor's
# JPEG 2000 row), pytest -m gpu on tests/test_gpu_j2k.py + tests/test_score_j2k_device.py (junit), and a
# SYNTHETIC scoring comparison: a J2K-only cohort (COHORT_N x ~2000 px, lossless) scored by the torch runner
# (fp16, batch BATCH) with --preprocess-device cpu (workers decode J2K at the reduced level) and cuda
# (nvImageCodec in the loop), run.json of each, and |delta bmd| between them (random weights: throughput and
# plumbing only). `bash benchmarks/gpu_j2k_check.sh dry-run` (anywhere) prints the plan and checks the files;
# `DEVICE=cpu PRECISION=fp32 SKIP_INSTALL=1 COHORT_N=4 COHORT_SIZE=512 OUT=/tmp/x bash ... run` smoke-tests the
# script itself on a CPU box (the GPU steps then record why they could not run).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
MODE=${1:-dry-run}
PY=${PYTHON:-python3}
SITE="$ROOT/.gpusite"
OUT=${OUT:-$ROOT/gpu_j2k_out}
COHORT_N=${COHORT_N:-256}
COHORT_SIZE=${COHORT_SIZE:-2000}
BATCH=${BATCH:-128}
DEVICE=${DEVICE:-cuda}         # DEVICE=cpu PRECISION=fp32 SKIP_INSTALL=1 COHORT_N=4: a CPU smoke of the script
PRECISION=${PRECISION:-fp16}
NPROC=$(nproc 2>/dev/null || echo 4)
WORKERS=${WORKERS:-$(( NPROC > 1 ? NPROC - 1 : 1 ))}
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

install_dir() {  # WHEELDIR: every wheel in it into $SITE, no index, no dependencies
  local d=$1
  ls "$d"/*.whl >/dev/null 2>&1 || { echo "no wheels in $d"; return 1; }
  mkdir -p "$SITE"
  "$PY" -m pip install -q --no-deps --no-index --no-compile --target "$SITE" "$d"/*.whl
}

case "$MODE" in
  dry-run)
    echo "plan: base (install .whl into .gpusite), then run (install .whl-j2k, facts, pytest -m gpu, scoring cpu vs cuda)"
    echo "cohort: $COHORT_N SYNTHETIC J2K files at $COHORT_SIZE px; torch fp16 batch $BATCH; workers $WORKERS"
    for d in .whl .whl-j2k; do
      if ls "$ROOT/$d"/*.whl >/dev/null 2>&1; then du -cb "$ROOT/$d"/*.whl | tail -1 | sed "s|total|bytes in $d|"
      else echo "dry-run: no wheels in $d (needed on the device box)"; fi
    done
    bash -n "$0" && echo "syntax ok"
    ;;
  base)
    install_dir "$ROOT/.whl" && "$PY" -c "import pydicom, polars, openjpeg; print('base installed in $SITE')"
    ;;
  run)
    mkdir -p "$OUT"
    [[ -n "${SKIP_INSTALL:-}" ]] || install_dir "$ROOT/.whl-j2k" || exit 1
    {
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
      "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
      "$PY" -c "from nvidia import nvimgcodec as n; print('nvimgcodec', n.__version__)"
      "$PY" -c "from xbmd_batch.gpu_j2k import status, GpuJ2KDecoder; print(status()); d = GpuJ2KDecoder('cuda'); print('self-test ok:', d.name)"
      "$PY" -m xbmd_batch doctor --json 2>/dev/null | "$PY" -c "import json,sys; print(json.load(sys.stdin)['jpeg2000_decode'])"
      uptime
    } > "$OUT/facts.txt" 2>&1
    cat "$OUT/facts.txt"
    timeout 300 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider --junitxml "$OUT/junit_gpu_j2k.xml" \
      tests/test_gpu_j2k.py tests/test_score_j2k_device.py 2>&1 | tail -25 | tee "$OUT/pytest.txt"
    W="$OUT/work"; mkdir -p "$W"
    timeout 120 "$PY" -m xbmd_batch synth "$W/cohort" --n "$COHORT_N" --size "$COHORT_SIZE" --seed 0 \
      --workers "$NPROC" --j2k-fraction 1 > "$OUT/synth.log" 2>&1 || { tail -5 "$OUT/synth.log"; exit 1; }
    timeout 60 "$PY" "$ROOT/benchmarks/gpu_first_light.py" make-model "$W/model.pt" --size 224 > /dev/null || exit 1
    for prep in cpu cuda; do
      t0=$SECONDS
      timeout 240 "$PY" -m xbmd_batch score "$W/cohort/dicom" "$W/cohort/meta.csv" \
        -m "$W/model.pt" --backend torch --device "$DEVICE" --precision "$PRECISION" -b "$BATCH" --workers "$WORKERS" \
        --preprocess-device "$prep" --max-missing 1 -o "$W/score_$prep" -q 2>&1 | tail -3
      echo "$prep: score wall $(( SECONDS - t0 )) s (whole process)" | tee -a "$OUT/walls.txt"
      cp "$W/score_$prep/run.json" "$OUT/run_$prep.json" 2>/dev/null
    done
    "$PY" - "$W" <<'PYEOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
import polars as pl
w = Path(sys.argv[1])
for prep in ("cpu", "cuda"):
    p = w / f"score_{prep}" / "run.json"
    if not p.exists():
        print(prep, "no run.json"); continue
    r = json.loads(p.read_text())
    print(prep, "images/s", r.get("throughput", {}).get("images_per_s"), "counts", r.get("counts", {}).get("scored"),
          "preprocess", json.dumps(r.get("preprocess")))
try:
    a = pl.read_parquet(w / "score_cpu" / "scores.parquet").select("relative_path", "bmd_pred")
    b = pl.read_parquet(w / "score_cuda" / "scores.parquet").select("relative_path", "bmd_pred")
    d = a.join(b, on="relative_path").with_columns((pl.col("bmd_pred") - pl.col("bmd_pred_right")).abs().alias("d"))
    print("rows", d.height, "max |delta bmd|", d["d"].max(), "mean", d["d"].mean(), "SD cpu", a["bmd_pred"].std(),
          "(random weights: parity of the plumbing only)")
except Exception as e:  # noqa: BLE001
    print("comparison failed:", e)
PYEOF
    ;;
  *)
    echo "usage: $0 dry-run|base|run"; exit 2 ;;
esac
