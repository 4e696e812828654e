"""JPEG 2000 reduced decode: the current level rule (>= 2x the model size after reduction) vs one level
more (>= 1x) vs a full decode -- decode + preprocess CPU time on one core and the effect on an image-sensitive
model's predictions. Not a test; SYNTHETIC files (``xbmd-batch synth --j2k-fraction 1``).

Model: default 224-px XAttnBMD, random weights (seed 0), last head layer scaled so that the prediction SD on
the full decodes is 0.08 g/cm2; metadata all missing. Reference: full decode + the same preprocessing.

Run:  .venv/bin/python benchmarks/j2k_levels.py DICOM_DIR N [--tag vm]  (decode 1 thread, model 2)
Writes benchmarks/results/j2k_levels_<tag>.json.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from xbmd_batch import dicom_io, preprocess  # noqa: E402
from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig  # noqa: E402
from xbmd_batch.model import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TAG = sys.argv[sys.argv.index("--tag") + 1] if "--tag" in sys.argv else "vm"
cfg = PreprocessConfig()
files = sorted(p for p in Path(sys.argv[1]).rglob("*") if p.is_file())[: int(sys.argv[2])]
torch.set_num_threads(2)


def full(p):
    img, info = dicom_io.read_image(p)  # full decode, grayscale
    return preprocess.preprocess_image(img, cfg), info


def level(p, over):
    old = dicom_io.J2K_OVERSAMPLE
    dicom_io.J2K_OVERSAMPLE = over
    try:
        return preprocess.load_and_preprocess(p, cfg)
    finally:
        dicom_io.J2K_OVERSAMPLE = old


x = {"full": [], "r_over2": [], "r_over1": []}
lv = {"r_over2": [], "r_over1": []}
t = {"r_over2": [], "r_over1": []}
for p in files:
    x["full"].append(full(p)[0])
    for k, over in (("r_over2", 2), ("r_over1", 1)):
        level(p, over)  # warm
        c = time.process_time()
        a, info = level(p, over)
        t[k].append((time.process_time() - c) * 1e3)
        x[k].append(a)
        lv[k].append(info.reduce_level)
torch.manual_seed(0)
model = build_model(ModelConfig.for_schema(DEFAULT_SCHEMA, dropout=0.0)).eval()
nf = len(DEFAULT_SCHEMA.fields)


def predict(xs):
    with torch.no_grad():
        b = torch.from_numpy(np.stack(xs))
        z = model(b, torch.zeros(len(b), nf), torch.zeros(len(b), nf))
        return (z[0] if isinstance(z, tuple) else z).numpy().astype(np.float64)


sd0 = predict(x["full"]).std()
with torch.no_grad():
    model.head.net[-1].weight.mul_(0.08 / sd0)
pf = predict(x["full"])
res = {
    "n": len(files),
    "prediction_sd_full": float(pf.std()),
    "load_average": [round(x, 2) for x in os.getloadavg()],
}
for k in ("r_over2", "r_over1"):
    d = np.abs(np.stack(x[k]) - np.stack(x["full"]))
    pk = predict(x[k])
    res[k] = {
        "levels": sorted(set(lv[k])),
        "cpu_ms_median": round(statistics.median(t[k]), 1),
        "input_mean": float(d.mean()),
        "input_max": float(d.max()),
        "pred_max": float(np.abs(pk - pf).max()),
        "pred_mean": float(np.abs(pk - pf).mean()),
    }
res["command"] = " ".join([".venv/bin/python", "benchmarks/j2k_levels.py", *sys.argv[1:]])
res["synthetic"] = True
res["preprocess_version"] = cfg.version
(ROOT / "benchmarks" / "results" / f"j2k_levels_{TAG}.json").write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(res, indent=1))
