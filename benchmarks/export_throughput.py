"""Export the default-size model to ONNX and compare onnxruntime-CPU with torch-CPU throughput.

Run from a checkout:
    .venv/bin/python benchmarks/export_throughput.py [--checkpoint best.pt] [--batches 1 16 64] [--fp16]

Without ``--checkpoint`` a default ModelConfig (224 px, d_model 256) with random weights is saved first (the
timings do not depend on the weights). Reports file size, export time and parity figures from the export's
model card, then img/s of the same runners ``score`` uses (``TorchRunner`` / ``OrtRunner``) on the same real
preprocessed synthetic inputs, warm-up first, iterations alternating between the two backends so a load
spike from other processes hits both alike. Prints a table and writes
``benchmarks/results/export_throughput_<host>.json`` with machine info, load average and the command.
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
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import cpu_model, load_average  # noqa: E402  (benchmarks/ is on sys.path)

from xbmd_batch.fsutil import now_iso

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # export/ is run from the checkout, not installed


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: random-weight default-size model")
    p.add_argument("--fusion", choices=("xattn", "concat"), default="xattn")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-iters", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=6.0, help="per backend and batch size")
    p.add_argument("--fp16", action="store_true", help="also export and time the fp16 ONNX variant")
    p.add_argument(
        "--ort-threads", type=int, default=None, help="onnxruntime intra-op threads (default: ORT's)"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--work-dir", type=Path, default=None, help="keep the checkpoint/ONNX here (default: temp)"
    )
    return p


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    return {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "cuda": bool(torch.cuda.is_available()),
    }


def make_checkpoint(path: Path, fusion: str) -> Path:
    import torch

    from xbmd_batch.checkpoint import save_checkpoint
    from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
    from xbmd_batch.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig.for_schema(DEFAULT_SCHEMA, fusion=fusion)
    summary = {"note": "random weights: benchmark only, predictions are meaningless"}
    return save_checkpoint(
        path, build_model(cfg), cfg, DEFAULT_SCHEMA, PreprocessConfig(cfg.image_size), summary
    )


def time_runners(
    runners: dict[str, Any], feeds: dict[str, Any], batches: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Per batch size: warm up every runner, then alternate single timed iterations until each has
    ``min_iters`` and ``min_seconds``."""
    rows = []
    for b in batches:
        sub = {k: v[:b] for k, v in feeds.items()}
        for r in runners.values():
            for _ in range(args.warmup):
                r.infer(sub)
        times: dict[str, list[float]] = {k: [] for k in runners}
        while any(len(t) < args.min_iters or sum(t) < args.min_seconds for t in times.values()):
            for name, r in runners.items():
                t0 = time.perf_counter()
                r.infer(sub)
                times[name].append(time.perf_counter() - t0)
        for name, t in times.items():
            med = statistics.median(t)
            rows.append(
                {
                    "runner": name,
                    "batch": b,
                    "iters": len(t),
                    "median_s": round(med, 5),
                    "img_per_s": round(b / med, 2),
                    "img_per_s_mean": round(b * len(t) / sum(t), 2),
                }
            )
        print(
            f"  batch {b:>3}: "
            + ", ".join(f"{r['runner']} {r['img_per_s']:.1f} img/s" for r in rows if r["batch"] == b),
            file=sys.stderr,
        )
    return rows


def main(args: argparse.Namespace) -> dict[str, Any]:
    from export.onnx_export import export_onnx
    from xbmd_batch.infer.ort_runner import OrtRunner
    from xbmd_batch.infer.torch_runner import TorchRunner
    from xbmd_batch.parity_feeds import make_reference_feeds

    tmp = None
    work = args.work_dir
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="xbmd-export-bench-")
        work = Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    ckpt = args.checkpoint or make_checkpoint(work / "model.pt", args.fusion)
    res = export_onnx(ckpt, work / "model.onnx", fp16=args.fp16, log=lambda m: print(m, file=sys.stderr))
    card = res.card
    feeds = make_reference_feeds(card, n=max(args.batches))

    runners: dict[str, Any] = {
        "torch-cpu-fp32": TorchRunner(ckpt),
        "onnxruntime-cpu-fp32": OrtRunner(res.path, intra_op_threads=args.ort_threads),
    }
    if res.fp16_path:
        runners["onnxruntime-cpu-fp16"] = OrtRunner(res.fp16_path, intra_op_threads=args.ort_threads)
    for r in runners.values():
        r.activate()
    rows = time_runners(runners, feeds, args.batches, args)
    for r in runners.values():
        r.deactivate()

    report = {
        "benchmark": "export_throughput",
        "created": now_iso(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "note": "CPU shared with other processes (see load averages); random weights unless --checkpoint",
        "model": {
            "fusion": card.model_config.fusion,
            "image_size": card.model_config.image_size,
            "d_model": card.model_config.d_model,
            "checkpoint": os.fspath(args.checkpoint) if args.checkpoint else "random weights",
        },
        "export": {
            "exporter": res.exporter,
            "export_time_s": res.export_time_s,
            "file_size_bytes": res.file_size_bytes,
            "parity": res.parity.to_dict(),
            "fp16_file_size_bytes": res.fp16_file_size_bytes,
            "fp16_parity": res.fp16_parity.to_dict() if res.fp16_parity else None,
        },
        "ort_intra_op_threads": args.ort_threads or "onnxruntime default",
        "throughput": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"export_throughput_{socket.gethostname()}.json"
    path.write_text(json.dumps(report, indent=2))
    table = format_table(report)
    path.with_suffix(".md").write_text(
        f"# export_throughput\n\n```\n{table}\n```\n\ncommand: `{report['command']}`\n"
    )
    print(table)
    print(f"\nwrote {path} and {path.with_suffix('.md').name}")
    if tmp is not None:
        tmp.cleanup()
    return report


def format_table(report: dict[str, Any]) -> str:
    e = report["export"]
    m = report["machine"]
    lines = [
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs), load {report['load_average_before']} -> "
        f"{report['load_average_after']} (shared with other processes)",
        f"export: {e['exporter']}, {e['export_time_s']:.1f} s, {e['file_size_bytes'] / 1e6:.1f} MB"
        + (f" (fp16 {e['fp16_file_size_bytes'] / 1e6:.1f} MB)" if e["fp16_file_size_bytes"] else ""),
    ]
    for label, p in (("fp32", e["parity"]), ("fp16", e["fp16_parity"])):
        if p:
            per = ", ".join(f"B={b}: {v['max_abs_bmd']:.1e}" for b, v in p["batches"].items())
            lines.append(f"parity {label} ({p['candidate']} vs {p['reference']}): max |dBMD| {per} g/cm^2")
    lines.append(f"\n{'runner':<24}{'batch':>6}{'iters':>7}{'median s':>11}{'img/s':>9}")
    for r in report["throughput"]:
        lines.append(
            f"{r['runner']:<24}{r['batch']:>6}{r['iters']:>7}{r['median_s']:>11.4f}{r['img_per_s']:>9.1f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
