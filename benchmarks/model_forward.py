"""Parameter counts and eval forward throughput of XAttnBMD and ConcatBaseline (default ModelConfig).

Run from a checkout:  .venv/bin/python benchmarks/model_forward.py [--batch 16 --iters 10 --warmup 3]
Prints a table and writes benchmarks/results/model_forward_<host>_<device>.{json,md}. Model forward only: no
DICOM decode, no preprocessing (see `xbmd-batch bench` for the pipeline). Random inputs, random weights: the
timings do not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _machine import cpu_model, load_average  # noqa: E402  (benchmarks/ is on sys.path)

from xbmd_batch.fsutil import now_iso

RESULTS = Path(__file__).resolve().parent / "results"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def bench_models(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Warm up both models, then time them in alternating iterations so a load spike hits both alike."""
    import torch

    from xbmd_batch.config import ModelConfig
    from xbmd_batch.model import build_model, count_parameters

    torch.manual_seed(0)
    device = torch.device(args.device)
    fusions = ("xattn", "concat")
    models = {
        f: build_model(ModelConfig(fusion=f, image_size=args.image_size)).eval().to(device) for f in fusions
    }
    b, s, n_fields = args.batch, args.image_size, models["xattn"].cfg.n_fields
    image = torch.randn(b, 1, s, s, device=device)
    meta = torch.randn(b, n_fields, device=device)
    mask = torch.ones(b, n_fields, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {f: [] for f in fusions}
    with torch.no_grad():
        for f in fusions:
            for _ in range(args.warmup):
                models[f](image, meta, mask, return_attention=True)
        sync()
        for _ in range(args.iters):
            for f in fusions:
                t0 = time.perf_counter()
                models[f](image, meta, mask, return_attention=True)
                sync()
                times[f].append(time.perf_counter() - t0)
    rows = []
    for f in fusions:
        med = statistics.median(times[f])
        rows.append(
            {
                "model": type(models[f]).__name__,
                "fusion": f,
                "params": count_parameters(models[f]),
                "batch": b,
                "image_size": s,
                "iters": args.iters,
                "warmup": args.warmup,
                "median_batch_s": round(med, 4),
                "min_batch_s": round(min(times[f]), 4),
                "img_per_s_median": round(b / med, 2),
                "img_per_s_best": round(b / min(times[f]), 2),
            }
        )
    return rows


def main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    load_before = load_average()
    rows = bench_models(args)
    load_after = load_average()
    machine = {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch": str(torch.__version__),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": load_after,
    }
    note = (
        "Shared machine: other processes may have been running during the measurement (see load average); "
        "treat these numbers as a lower bound for an idle machine. Random weights and inputs."
    )
    result = {
        "benchmark": "model_forward",
        "created": now_iso(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": machine,
        "note": note,
        "results": rows,
    }

    header = "| model | params | batch | image | median s/batch | img/s (median) | img/s (best) |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['batch']} | {r['image_size']}² | {r['median_batch_s']} "
            f"| {r['img_per_s_median']} | {r['img_per_s_best']} |"
        )
    md = "\n".join(
        [
            "# Model forward throughput (eval, no_grad, fp32; models timed alternately)",
            "",
            *lines,
            "",
            f"- machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores, "
            f"torch {machine['torch']} ({machine['torch_threads']} threads), device {machine['device']}",
            f"- load average (1/5/15 min) before: {load_before}, after: {load_after} "
            f"({machine['logical_cores']} cores)",
            f"- command: `{result['command']}`",
            f"- created: {result['created']}",
            f"- note: {note}",
            "",
        ]
    )
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"model_forward_{machine['host']}_{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(f"wrote {stem}.json and {stem}.md")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
