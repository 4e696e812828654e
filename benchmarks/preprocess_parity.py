"""Preprocessing definitions compared on model inputs and on an image-sensitive model's predictions.

Not a test. SYNTHETIC cohort files (``xbmd-batch synth``); for each file the model input under preprocessing
version 2 (float32 full matrix, Pillow resize), 3 (block means) and 4 (the current one) is computed, then a
random-weight default 224-px XAttnBMD (seed 0) whose last head layer is scaled so that its prediction SD on
these files is 0.08 g/cm2 under version 2 (metadata all missing: only the image path differs) predicts all
three; reported: per version, |input - v2| (mean, p99, max; model-input units) and |prediction - v2|
(max, mean; g/cm2). Issue 11's target: predictions of the new path within 0.002 g/cm2 of the old.

Run:  .venv/bin/python benchmarks/preprocess_parity.py DICOM_DIR [--n 64] [--tag vm]
Writes benchmarks/results/preprocess_parity_<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import command_line, predict, write_results  # noqa: E402
from _machine import cpu_model, load_average  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dicom_dir", type=Path)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="vm")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from xbmd_batch import preprocess, preprocess_v2
    from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
    from xbmd_batch.model import build_model

    torch.set_num_threads(args.threads)
    load0 = load_average()
    files = sorted(p for p in args.dicom_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = files[: args.n]
    cur = PreprocessConfig()
    cfgs = {2: dataclasses.replace(cur, version=2), 3: dataclasses.replace(cur, version=3), cur.version: cur}
    x: dict[int, list[np.ndarray]] = {v: [] for v in cfgs}
    for f in files:
        for v, c in cfgs.items():
            fn = preprocess_v2.load_and_preprocess if v == 2 else preprocess.load_and_preprocess
            x[v].append(fn(f, c)[0])
    torch.manual_seed(0)
    model = build_model(ModelConfig.for_schema(DEFAULT_SCHEMA, dropout=0.0)).eval()
    nf = len(DEFAULT_SCHEMA.fields)
    sd0 = float(predict(model, x[2], nf).std())
    last = model.head.net[-1]
    with torch.no_grad():
        last.weight.mul_(0.08 / max(sd0, 1e-9))
    pred = {v: predict(model, xs, nf) for v, xs in x.items()}
    res: dict[str, Any] = {
        "what": "preprocessing versions vs version 2: model inputs and predictions (SYNTHETIC)",
        "command": command_line("preprocess_parity.py"),
        "machine": cpu_model(),
        "load_average_before": load0,
        "n_files": len(files),
        "prediction_sd_v2": float(pred[2].std()),
        "versions": {},
    }
    for v in cfgs:
        if v == 2:
            continue
        d_in = np.abs(np.stack(x[v]) - np.stack(x[2]))
        per_file = d_in.reshape(len(files), -1)
        d_pred = np.abs(pred[v] - pred[2])
        res["versions"][str(v)] = {
            "input_mean": float(d_in.mean()),
            "input_p99_worst_file": float(np.percentile(per_file, 99, axis=1).max()),
            "input_max": float(d_in.max()),
            "prediction_max_abs_diff_g_cm2": float(d_pred.max()),
            "prediction_mean_abs_diff_g_cm2": float(d_pred.mean()),
        }
    res["load_average_after"] = load_average()
    write_results(f"preprocess_parity_{args.tag}", res, _markdown(res))
    return res


def _markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Preprocessing versions vs version 2 (SYNTHETIC, issue 11)",
        "",
        f"`{res['command']}` · {res['machine']} · load {res['load_average_before']} → "
        f"{res['load_average_after']} · {res['n_files']} files · prediction SD (v2) "
        f"{res['prediction_sd_v2']:.3f} g/cm²",
        "",
        "| version | input mean | input p99 (worst file) | input max | prediction max Δ g/cm² | mean Δ |",
        "|---|---|---|---|---|---|",
    ]
    for v, r in res["versions"].items():
        lines.append(
            f"| {v} | {r['input_mean']:.2e} | {r['input_p99_worst_file']:.2e} | {r['input_max']:.2e} | "
            f"{r['prediction_max_abs_diff_g_cm2']:.2e} | {r['prediction_mean_abs_diff_g_cm2']:.2e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main(get_args_parser().parse_args())
