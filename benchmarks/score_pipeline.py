"""Benchmark of `xbmd-batch score` on this machine (not a test). Every cohort here is SYNTHETIC.

1. End-to-end images/s vs model-only images/s of the same backend and batch size (target >= 0.9: decode is
   hidden behind inference). Full-size model (ModelConfig defaults, 224 px), onnxruntime-CPU, exported with
   export.onnx_export; an uncompressed cohort of realistic matrix size (~2000 px).
2. A JPEG 2000 (lossless) cohort vs the same cohort uncompressed, end to end (target >= 0.6 with the
   resolution-aware decode); the one-process full-decode J2K cost is reported alongside for context.
3. Peak RSS (scoring process + decode workers, sampled every 0.1 s) on a 10,000-file cohort vs a 1,000-file
   one (flat = memory does not grow with the cohort). The 10k cohort is the 1k synthetic cohort copied 10
   times with a new PatientID and SOPInstanceUID per copy (and META rows duplicated under the new IDs):
   synthesising 10k files would cost minutes and tests nothing more about memory. Tiny model (64 px).

Run:  .venv/bin/python benchmarks/score_pipeline.py [--n 160] [--size 2000] [--skip-rss]
Writes benchmarks/results/score_pipeline_<tag>.json and .md (machine info, load average, command).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, run_sampling_rss, write_results  # noqa: E402
from _machine import load_average  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/xbmd_bench_score"))
    p.add_argument("--n", type=int, default=160, help="images per cohort for the throughput runs")
    p.add_argument("--size", type=int, default=2000, help="nominal matrix rows of the synthetic images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--model-iters", type=int, default=8)
    p.add_argument("--rss-small", type=int, default=1000)
    p.add_argument("--rss-factor", type=int, default=10)
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--tag", default="vm")
    p.add_argument(
        "--parity-model",
        type=Path,
        default=None,
        help="trained .pt/.onnx: J2K resolution-aware vs full decode, prediction differences",
    )
    p.add_argument("--parity-n", type=int, default=32)
    return p


def _models(work: Path) -> dict[str, Path]:
    """Full-size and tiny checkpoints (random weights) and their ONNX exports (export.onnx_export)."""
    import torch

    from export.onnx_export import export_onnx
    from xbmd_batch.checkpoint import save_checkpoint
    from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
    from xbmd_batch.model import build_model

    out: dict[str, Path] = {}
    for name, kw in {
        "full": {},
        "tiny": dict(image_size=64, d_model=32, meta_hidden=32, head_hidden=32),
    }.items():
        onnx_path = work / f"{name}.onnx"
        if not onnx_path.is_file():
            torch.manual_seed(0)
            cfg = ModelConfig.for_schema(DEFAULT_SCHEMA, dropout=0.0, **kw)
            ckpt = save_checkpoint(
                work / f"{name}.pt", build_model(cfg).eval(), cfg, DEFAULT_SCHEMA,
                PreprocessConfig(image_size=cfg.image_size),
            )  # fmt: skip
            export_onnx(ckpt, onnx_path, batch_sizes=(1, 3))
        out[name] = onnx_path
    return out


def _cohort(path: Path, n: int, size: int, j2k: float, seed: int) -> Path:
    from xbmd_batch.synth import SynthConfig, generate_cohort

    if not (path / "cohort.json").is_file():
        generate_cohort(path, SynthConfig(n=n, size=size, seed=seed, j2k_fraction=j2k, mono1_fraction=0.3),
                        progress=False)  # fmt: skip
    return path


def _replicate(src: Path, dst: Path, factor: int) -> Path:
    """dst = src copied ``factor`` times, each copy with new PatientIDs / SOP UIDs and matching META rows."""
    import pydicom

    if (dst / "meta.csv").is_file():
        return dst
    files = sorted(p for p in (src / "dicom").rglob("*") if p.is_file())
    rows = list(csv.reader((src / "meta.csv").open()))
    header, body = rows[0], rows[1:]
    with (dst.parent / f"{dst.name}.meta.tmp").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for k in range(factor):
            for r in body:
                w.writerow([f"{r[0]}_C{k:02d}", *r[1:]])
    for k in range(factor):
        for p in files:
            ds = pydicom.dcmread(p)
            ds.PatientID = f"{ds.PatientID}_C{k:02d}"
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            q = dst / "dicom" / f"C{k:02d}" / p.relative_to(src / "dicom")
            q.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(q)
    shutil.copy(src / "cohort.json", dst / "cohort.json")
    os.replace(dst.parent / f"{dst.name}.meta.tmp", dst / "meta.csv")
    return dst


def _score_subprocess(cohort: Path, model: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """Run the CLI; sample RSS of the process tree (main + decode workers + forkserver) every 0.1 s."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "xbmd_batch", "score", str(cohort / "dicom"), str(cohort / "meta.csv"),
           "--model", str(model), "--out", str(out), "--quiet", *extra]  # fmt: skip
    ran = run_sampling_rss(cmd, cwd=ROOT, tree=True)
    run = json.loads((out / "run.json").read_text())
    return {
        "exit_code": ran.returncode,
        "wall_s": round(ran.wall_s, 2),
        "images": run["counts"]["scored"],
        "images_per_s": run["throughput"]["images_per_s"],
        "peak_rss_main_mb": round(ran.peak_rss_main / 2**20, 1),
        "peak_rss_tree_mb": round(ran.peak_rss_tree / 2**20, 1),
        "decode_wait_share": run["stage_shares"].get("decode_wait"),
        "stderr_tail": ran.stderr.decode()[-300:] if ran.returncode not in (0, 3) else "",
    }


def throughput(args: argparse.Namespace, models: dict[str, Path]) -> dict[str, Any]:
    from xbmd_batch.bench import BenchOptions, bench_decode, bench_end_to_end, bench_headers, bench_model
    from xbmd_batch.dicom_io import read_image
    from xbmd_batch.infer.model_file import open_model

    work = args.work
    unc = _cohort(work / f"unc_{args.n}_{args.size}", args.n, args.size, 0.0, seed=11)
    j2k = _cohort(work / f"j2k_{args.n}_{args.size}", args.n, args.size, 1.0, seed=11)
    model_path = models["full"]
    model = open_model(model_path)
    card = model.card
    o = BenchOptions(backends=("onnxruntime",), batch_size=args.batch_size, workers=args.workers,
                     model_iters=args.model_iters)  # fmt: skip
    res: dict[str, Any] = {"cohorts": {"uncompressed": str(unc), "j2k_lossless": str(j2k)}}
    hdr, headers_u = bench_headers(unc / "dicom")
    dec_u, images = bench_decode(unc / "dicom", headers_u, card, 16)
    _, headers_j = bench_headers(j2k / "dicom")
    dec_j, _ = bench_decode(j2k / "dicom", headers_j, card, 16)
    j2k_files = [j2k / "dicom" / r for r in headers_j["relative_path"].to_list()[:6]]
    t0 = time.perf_counter()
    for p in j2k_files:
        read_image(p, target_size=None)
    full_ms = 1000 * (time.perf_counter() - t0) / len(j2k_files)
    res["stages"] = [hdr, *dec_u, *dec_j]
    res["j2k_full_decode_ms_per_image_one_process"] = round(full_ms, 1)

    m1 = bench_model(model, "onnxruntime", o, images, len(card.schema.fields))
    for stale in ("out_unc", "out_j2k"):  # a previous benchmark's run folder would be resumed, not re-timed
        shutil.rmtree(work / stale, ignore_errors=True)
    e_u = bench_end_to_end(unc / "dicom", unc / "meta.csv", model_path, work / "out_unc", "onnxruntime", o)
    e_j = bench_end_to_end(j2k / "dicom", j2k / "meta.csv", model_path, work / "out_j2k", "onnxruntime", o)
    m2 = bench_model(model, "onnxruntime", o, images, len(card.schema.fields))
    model_only = (m1["items_per_s"] + m2["items_per_s"]) / 2
    res.update(
        {
            "model_only_images_per_s": [round(m1["items_per_s"], 2), round(m2["items_per_s"], 2)],
            "end_to_end_uncompressed_images_per_s": e_u["items_per_s"],
            "end_to_end_j2k_images_per_s": e_j["items_per_s"],
            "ratio_e2e_to_model_only": round(e_u["items_per_s"] / model_only, 3),
            "ratio_j2k_to_uncompressed": round(e_j["items_per_s"] / e_u["items_per_s"], 3),
            "backend": m1["backend"],
            "precision": m1["precision"],
            "batch_size": args.batch_size,
            "decode_wait_share_uncompressed": json.loads((work / "out_unc" / "run.json").read_text())[
                "stage_shares"
            ].get("decode_wait"),
            "decode_wait_share_j2k": json.loads((work / "out_j2k" / "run.json").read_text())[
                "stage_shares"
            ].get("decode_wait"),
        }
    )
    return res


def j2k_parity(args: argparse.Namespace) -> dict[str, Any]:
    """Predictions of a (trained) model from the resolution-aware J2K decode vs full decode + resize, on the
    J2K cohort; metadata all marked missing so only the image path differs."""
    import numpy as np

    from xbmd_batch.dicom_io import read_image
    from xbmd_batch.infer.model_file import open_model
    from xbmd_batch.infer.select import open_runner
    from xbmd_batch.preprocess import load_and_preprocess, preprocess_image

    j2k = _cohort(args.work / f"j2k_{args.n}_{args.size}", args.n, args.size, 1.0, seed=11)
    files = sorted(p for p in (j2k / "dicom").rglob("*") if p.is_file())[: args.parity_n]
    model = open_model(args.parity_model)
    card = model.card
    cfg = card.preprocess
    red, full, levels = [], [], []
    for p in files:
        a, info = load_and_preprocess(p, cfg)
        red.append(a)
        levels.append(info.reduce_level)
        img, _ = read_image(p, target_size=None, apply_voi=cfg.apply_voi)
        full.append(preprocess_image(img, cfg))
    f = len(card.schema.fields)
    z = np.zeros((len(files), f), np.float32)
    with open_runner(model, batch_size=len(files)) as r:
        br = r.infer({"image": np.stack(red), "meta": z, "meta_mask": z})["bmd"].astype(np.float64)
        bf = r.infer({"image": np.stack(full), "meta": z, "meta_mask": z})["bmd"].astype(np.float64)
    d = np.abs(br - bf)
    ts = card.training_summary or {}
    return {
        "model": str(args.parity_model),
        "model_training": {k: ts.get(k) for k in ("n_train", "epochs", "synthetic_cohort", "variant")},
        "image_size": cfg.image_size,
        "n": len(files),
        "reduce_levels": sorted(set(levels)),
        "max_abs_diff_g_cm2": round(float(d.max()), 5),
        "mean_abs_diff_g_cm2": round(float(d.mean()), 5),
        "sd_of_predictions_full_decode": round(float(bf.std()), 5),
        "target": "max_abs_diff <= 0.005",
    }


def rss(args: argparse.Namespace, models: dict[str, Path]) -> dict[str, Any]:
    small = _cohort(args.work / f"rss_{args.rss_small}", args.rss_small, 256, 0.0, seed=3)
    t0 = time.perf_counter()
    large = _replicate(small, args.work / f"rss_{args.rss_small}x{args.rss_factor}", args.rss_factor)
    rep_s = time.perf_counter() - t0
    extra = ["--batch-size", "64", "--backend", "onnxruntime"]
    r_small = _score_subprocess(small, models["tiny"], args.work / "out_rss_small", extra)
    r_large = _score_subprocess(large, models["tiny"], args.work / "out_rss_large", extra)
    return {
        "small": r_small,
        "large": r_large,
        "ratio_peak_tree_large_to_small": round(r_large["peak_rss_tree_mb"] / r_small["peak_rss_tree_mb"], 3),
        "replicate_seconds": round(rep_s, 1),
        "how": "large = small copied x factor with new PatientID + SOPInstanceUID per copy (pydicom rewrite)",
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    from xbmd_batch.fsutil import now_iso
    from xbmd_batch.score.manifest import machine_info, versions

    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "score_pipeline",
        "synthetic": True,
        "created": now_iso(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "versions": versions(),
        "load_avg_before": load_average(),
    }
    models = _models(args.work)
    if not args.skip_throughput:
        result["throughput"] = throughput(args, models)
    if not args.skip_rss:
        result["rss"] = rss(args, models)
    if args.parity_model:
        result["j2k_parity"] = j2k_parity(args)
    result["load_avg_after"] = load_average()
    write_results(f"score_pipeline_{args.tag}", result, _markdown(result), default=str)
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = ["# score pipeline benchmark (SYNTHETIC cohorts)", ""]
    t = r.get("throughput")
    if t:
        lines += [
            f"Full-size model (224 px, random weights), {t['backend']} {t['precision']}, "
            f"batch {t['batch_size']}.",
            "",
            "| measure | value | target |",
            "|---|---:|---:|",
            f"| model-only images/s (before, after) | {t['model_only_images_per_s']} | |",
            f"| end-to-end images/s, uncompressed | {t['end_to_end_uncompressed_images_per_s']:.2f} | |",
            f"| end-to-end / model-only | {t['ratio_e2e_to_model_only']:.3f} | >= 0.9 |",
            f"| end-to-end images/s, JPEG 2000 lossless | {t['end_to_end_j2k_images_per_s']:.2f} | |",
            f"| JPEG 2000 / uncompressed | {t['ratio_j2k_to_uncompressed']:.3f} | >= 0.6 |",
            f"| decode_wait share (unc, j2k) | {t['decode_wait_share_uncompressed']}, "
            f"{t['decode_wait_share_j2k']} | |",
            f"| J2K full decode, one process | {t['j2k_full_decode_ms_per_image_one_process']} ms/image | |",
            "",
            "| stage | transfer syntax | n | items/s | note |",
            "|---|---|---:|---:|---|",
        ]
        for s in t["stages"]:
            ips = s["items_per_s"]
            lines.append(f"| {s['stage']} | {s['transfer_syntax'] or ''} | {s['n']} | "
                         f"{'' if ips is None else f'{ips:.1f}'} | {s['note'] or ''} |")  # fmt: skip
        lines.append("")
    q = r.get("rss")
    if q:
        lines += [
            "| cohort | images | wall s | images/s | peak RSS main MB | peak RSS tree MB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for k in ("small", "large"):
            x = q[k]
            lines.append(f"| {k} | {x['images']} | {x['wall_s']} | {x['images_per_s']} | "
                         f"{x['peak_rss_main_mb']} | {x['peak_rss_tree_mb']} |")  # fmt: skip
        lines += [
            "",
            f"Peak RSS (tree) large / small: {q['ratio_peak_tree_large_to_small']} ({q['how']}).",
            "",
        ]
    jp = r.get("j2k_parity")
    if jp:
        lines += [
            f"J2K resolution-aware vs full decode, model `{jp['model']}` ({jp['model_training']}), "
            f"{jp['image_size']} px, n={jp['n']}, reduce levels {jp['reduce_levels']}: max |diff| "
            f"{jp['max_abs_diff_g_cm2']} g/cm2, mean {jp['mean_abs_diff_g_cm2']} (SD of predictions "
            f"{jp['sd_of_predictions_full_decode']}; target max <= 0.005).",
            "",
        ]
    m = r["machine"]
    lines += [
        f"- machine: {m.get('cpu_model')}, {m.get('cpu_count')} logical cores, {m.get('memory_gb')} GB",
        f"- load average before {r['load_avg_before']}, after {r.get('load_avg_after')} (shared machine: "
        "other engineers' jobs were running; treat throughput as a lower bound)",
        f"- command: `{r['command']}`",
        f"- created: {r['created']}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(get_args_parser().parse_args())
