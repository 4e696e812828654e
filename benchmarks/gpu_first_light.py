"""Python half of ``benchmarks/gpu_first_light.sh`` (the bash script runs the steps; this file does the parts
that are easier in Python). Subcommands:

- ``facts OUT.json``: GPU/driver/CUDA/torch/onnxruntime/TensorRT facts of this machine.
- ``make-model CKPT --size 224``: a random-weight checkpoint (seed 0; weights are not trained: the numbers it
  gives are throughput only, and predictions are meaningless).
- ``sample-gpu CSV --interval 0.25``: GPU utilisation samples with epoch timestamps until killed (pynvml when
  importable, else ``nvidia-smi``).
- ``summarize OUT``: reads OUT/steps.jsonl, the bench.json files under OUT/work/bench, the steady-state
  score runs' run.json under OUT/work/steady, OUT/gpu_util.csv and the facts; writes OUT/summary.json and
  OUT/summary.md (every throughput row labelled SYNTHETIC cohort, with the GPU utilisation measured during
  that bench call or score run).

Only the standard library at import time: ``summarize`` must run even where the project's dependencies did not
install.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def facts() -> dict[str, Any]:
    """What this run ran on (recorded beside every number)."""
    d: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "dev_shm": _dev_shm(),
    }
    smi = _run(
        [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm",
            "--format=csv,noheader",
        ]
    )
    d["nvidia_smi"] = smi.splitlines() if smi else None
    try:
        import torch

        d["torch"] = str(torch.__version__)
        d["torch_cuda"] = torch.version.cuda
        d["cuda_available"] = bool(torch.cuda.is_available())
        if d["cuda_available"]:
            d["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            d["cudnn"] = torch.backends.cudnn.version()
    except Exception as e:  # report, never fail: facts must be written on a broken box too
        d["torch"] = f"not importable: {type(e).__name__}: {e}"
    for mod in ("onnxruntime", "tensorrt", "onnx", "pydicom", "polars"):
        try:
            m = __import__(mod)
            d[mod] = str(getattr(m, "__version__", "?"))
            if mod == "onnxruntime":
                d["onnxruntime_providers"] = list(m.get_available_providers())
        except Exception as e:
            d[mod] = f"not importable: {type(e).__name__}"
    return d


def _dev_shm() -> dict[str, int] | None:
    """/dev/shm size and free bytes: the decode pool's shared-memory slots live there (a small one, e.g.
    Docker's 64 MB, shrinks the slots and images then travel by value)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return {"total_bytes": st.f_blocks * st.f_frsize, "free_bytes": st.f_bavail * st.f_frsize}


def make_model(path: Path, size: int) -> Path:
    import torch

    from xbmd_batch.checkpoint import save_checkpoint
    from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
    from xbmd_batch.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig.for_schema(DEFAULT_SCHEMA, image_size=size)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, build_model(cfg), cfg, DEFAULT_SCHEMA, PreprocessConfig(image_size=size))


def sample_gpu(path: Path, interval: float) -> None:
    """Append ``epoch_s,gpu_util_pct,mem_util_pct,mem_used_mib,power_w`` rows until killed."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("FIRST_LIGHT_GPU", "0")))

        def read() -> list[float]:
            u = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
            power = pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0
            return [float(u.gpu), float(u.memory), round(mem, 1), round(power, 1)]

    except Exception:  # no pynvml: nvidia-smi once per sample (slower, same columns)

        def read() -> list[float]:
            out = _run(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,utilization.memory,memory.used,power.draw",
                    "--format=csv,noheader,nounits",
                ]
            )
            if not out:
                raise SystemExit("sample-gpu: neither pynvml nor nvidia-smi answers")
            return [float(x) for x in out.splitlines()[0].split(",")]

    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if f.tell() == 0:
            w.writerow(["epoch_s", "gpu_util_pct", "mem_util_pct", "mem_used_mib", "power_w"])
        while True:
            w.writerow([round(time.time(), 3), *read()])
            f.flush()
            time.sleep(interval)


def _read_util(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _util_between(samples: list[dict[str, float]], start: float, end: float) -> dict[str, float] | None:
    inside = [s for s in samples if start <= s["epoch_s"] <= end]
    if not inside:
        return None
    u = [s["gpu_util_pct"] for s in inside]
    return {
        "samples": len(inside),
        "gpu_util_mean_pct": round(sum(u) / len(u), 1),
        "gpu_util_max_pct": max(u),
        "mem_used_max_mib": max(s["mem_used_mib"] for s in inside),
    }


def summarize(out: Path) -> dict[str, Any]:
    """Merge steps, bench results and GPU samples into OUT/summary.json and OUT/summary.md."""
    steps = []
    steps_file = out / "steps.jsonl"
    if steps_file.is_file():
        steps = [json.loads(line) for line in steps_file.read_text().splitlines() if line.strip()]
    samples = _read_util(out / "gpu_util.csv")
    facts_file = out / "work" / "facts.json"
    machine = json.loads(facts_file.read_text()) if facts_file.is_file() else {}
    by_step = {s["step"]: s for s in steps}
    bench_rows: list[dict[str, Any]] = []
    for bj in sorted((out / "work" / "bench").glob("*/bench.json")):
        info = json.loads(bj.read_text())
        step = by_step.get(f"bench_{bj.parent.name}", {})
        util = _util_between(samples, step.get("start", 0.0), step.get("end", 0.0)) if step else None
        for r in info.get("rows", []):
            bench_rows.append(
                {
                    "call": bj.parent.name,
                    "synthetic_cohort": info.get("synthetic_cohort"),
                    **r,
                    "gpu_util_during_call": util,
                }
            )
    summary = {
        "what": "xbmd-batch GPU first light (benchmarks/gpu_first_light.sh)",
        "cohort": "SYNTHETIC (xbmd-batch synth); model: random weights (throughput only)",
        "machine": machine,
        "steps": steps,
        "bench": bench_rows,
        "steady": steady_rows(out, by_step, samples),
        "gpu_samples": len(samples),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(render_md(summary))
    return summary


def steady_rows(
    out: Path, by_step: dict[str, dict[str, Any]], samples: list[dict[str, float]]
) -> list[dict[str, Any]]:
    """One row per steady-state score run (OUT/work/steady/<prep>_r<round>/run.json): throughput, where
    preprocessing finished and why, the page-locking report, stage times, GPU utilisation during the run."""
    rows = []
    for rj in sorted((out / "work" / "steady").glob("*/run.json")):
        try:
            run = json.loads(rj.read_text())
        except (OSError, ValueError):
            continue
        step = by_step.get(f"steady_{rj.parent.name}", {})
        tp, prep, t = run.get("throughput") or {}, run.get("preprocess") or {}, run.get("timings_s") or {}
        rows.append(
            {
                "call": rj.parent.name,
                "synthetic_cohort": True,
                "status": run.get("status"),
                "scored": (run.get("counts") or {}).get("scored"),
                "images_per_s": tp.get("images_per_s"),
                "scoring_loop_s": tp.get("scoring_loop_s"),
                "wall_s": tp.get("wall_s"),
                "step_s": step.get("seconds"),
                "preprocess_device": prep.get("device"),
                "preprocess_reason": prep.get("reason"),
                "upload": prep.get("upload"),
                "infer_s": t.get("infer"),
                "preprocess_device_s": t.get("preprocess_device"),
                "decode_wait_s": t.get("decode_wait"),
                "model_load_s": t.get("model_load"),
                "gpu_util_during_call": _util_between(samples, step["start"], step["end"]) if step else None,
            }
        )
    return rows


def _fmt(x: Any, nd: int = 1) -> str:
    return "" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def render_md(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        "# xbmd-batch GPU first light",
        "",
        f"Machine: {m.get('nvidia_smi') or 'no nvidia-smi'}; "
        f"torch {m.get('torch')} (CUDA {m.get('torch_cuda')}); "
        f"onnxruntime {m.get('onnxruntime')}; TensorRT {m.get('tensorrt')}; {m.get('cpu_count')} CPUs; "
        f"{m.get('date_utc')}.",
        f"Cohort: {summary['cohort']}.",
        "",
        "## Steps",
        "",
        "| step | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for s in summary["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {_fmt(s.get('seconds'))} | {s.get('note', '')} |")
    lines += [
        "",
        "## Throughput (SYNTHETIC cohort)",
        "",
        "| call | stage | backend | precision | syntax | batch | n | items/s | ratio e2e/model "
        "| GPU util mean/max % |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in summary["bench"]:
        u = r.get("gpu_util_during_call")
        util = f"{u['gpu_util_mean_pct']}/{u['gpu_util_max_pct']}" if u else ""
        lines.append(
            f"| {r['call']} | {r.get('stage')} | {r.get('backend') or ''} | {r.get('precision') or ''} | "
            f"{r.get('transfer_syntax') or ''} | {_fmt(r.get('batch_size'))} | {_fmt(r.get('n'))} | "
            f"{_fmt(r.get('items_per_s'))} | {_fmt(r.get('ratio_to_model_only'), 2)} | {util} |"
        )
    if summary.get("steady"):
        lines += [
            "",
            "## Steady state: score end to end, CPU vs GPU finishing back to back (SYNTHETIC cohort)",
            "",
            "| run | scored | loop images/s | loop s | wall s | finished on | page-locked MiB (s) | infer s "
            "| prep-device s | decode wait s | GPU util mean/max % |",
            "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---|",
        ]
        for r in summary["steady"]:
            u, up = r.get("gpu_util_during_call"), r.get("upload")
            util = f"{u['gpu_util_mean_pct']}/{u['gpu_util_max_pct']}" if u else ""
            pin = ""
            if up and up.get("disabled"):
                pin = "off (pageable)"
            elif up:
                pin = (
                    f"{up.get('bytes', 0) / 2**20:.0f} ({up.get('seconds')})"
                    if not up.get("failure")
                    else f"failed: {up['failure']}"
                )
            lines.append(
                f"| {r['call']} | {_fmt(r.get('scored'))} | {_fmt(r.get('images_per_s'))} | "
                f"{_fmt(r.get('scoring_loop_s'), 2)} | {_fmt(r.get('wall_s'), 1)} | "
                f"{r.get('preprocess_device') or ''} | {pin} | {_fmt(r.get('infer_s'), 2)} | "
                f"{_fmt(r.get('preprocess_device_s'), 2)} | {_fmt(r.get('decode_wait_s'), 2)} | {util} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_first_light.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("facts")
    f.add_argument("out", type=Path)
    mm = sub.add_parser("make-model")
    mm.add_argument("out", type=Path)
    mm.add_argument("--size", type=int, default=224)
    sg = sub.add_parser("sample-gpu")
    sg.add_argument("out", type=Path)
    sg.add_argument("--interval", type=float, default=0.25)
    sm = sub.add_parser("summarize")
    sm.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "facts":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(facts(), indent=2, default=str) + "\n")
    elif a.cmd == "make-model":
        print(make_model(a.out, a.size))
    elif a.cmd == "sample-gpu":
        sample_gpu(a.out, a.interval)
    else:
        s = summarize(a.out)
        print(
            f"summary: {len(s['steps'])} steps, {len(s['bench'])} bench rows, {len(s['steady'])} steady runs "
            f"-> {a.out / 'summary.md'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
