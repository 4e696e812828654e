"""``python -m export``: a thin argparse adapter over export.onnx_export and xbmd_batch.infer.tensorrt.

Exit codes: 0 ok; 1 a check failed (parity, checker, TensorRT build); 2 bad input (file, option);
3 a needed package or device is missing (tensorrt / CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from xbmd_batch.defaults import DEFAULT_BATCH_SIZE, TRT_PRECISIONS
from xbmd_batch.errors import InputError, XbmdError

EPILOG_ONNX = """example:
  python -m export onnx runs/fold0/best.pt --out model.onnx
  python -m export onnx best.pt --out model.onnx --fp16 --parity-cohort demo_out/cohort
  python -m export onnx runs/demo --ensemble --out ensemble.onnx   # K fold models, mean + between-model SD
"""
EPILOG_TRT = """example:
  python -m export tensorrt model.onnx --opt-batch 32 --max-batch 64 --precision fp16
  python -m export tensorrt model.onnx --cache-dir /scratch/engines --rebuild
"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export an xbmd-batch checkpoint to ONNX (with its model card and parity checks), "
        "and build TensorRT engines from it.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser(
        "onnx",
        help="checkpoint -> ONNX with the model card embedded; checker + onnxruntime-vs-torch parity",
        epilog=EPILOG_ONNX,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    o.add_argument("checkpoint", type=Path, help="training checkpoint (.pt); with --ensemble: the run folder")
    o.add_argument(
        "--ensemble",
        action="store_true",
        help="pack the run's K fold models (fold_*.pt) into one graph: mean bmd, bmd_sd_models, mean "
        "attention (K forward passes per image: about K x the model-only cost)",
    )
    o.add_argument(
        "--out", type=Path, required=True, help="output .onnx path (written only if all checks pass)"
    )
    o.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; default 18)")
    o.add_argument(
        "--fp16", action="store_true", help="also write <out>.fp16.onnx (LayerNorm/Softmax in fp32)"
    )
    o.add_argument(
        "--parity-cohort", type=Path, default=None, help="existing synthetic cohort (xbmd-batch synth)"
    )
    o.add_argument("--tolerance", type=float, default=1e-4, help="max |dBMD| g/cm^2 for fp32 (default 1e-4)")
    o.add_argument("--fp16-tolerance", type=float, default=5e-3, help="max |dBMD| for fp16 (default 5e-3)")
    o.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "legacy"),
        default="auto",
        help="default: dynamo, legacy fallback",
    )
    o.add_argument("--json", action="store_true", help="print the result as JSON")

    t = sub.add_parser(
        "tensorrt",
        help="build (or reuse) the TensorRT engine for this GPU in the engine cache",
        epilog=EPILOG_TRT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("onnx", type=Path, help="exported ONNX file (with its model card)")
    t.add_argument(
        "--opt-batch",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="batch size the kernels are tuned for (= score batch)",
    )
    t.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="largest batch (default: the wide profile, 256; score reuses any engine whose max >= its batch)",
    )
    t.add_argument("--min-batch", type=int, default=1)
    t.add_argument("--precision", choices=TRT_PRECISIONS, default=TRT_PRECISIONS[0])
    t.add_argument(
        "--cache-dir", type=Path, default=None, help="engine cache (default $XBMD_ENGINE_CACHE or ~/.cache)"
    )
    t.add_argument(
        "--timing-cache", type=Path, default=None, help="timing cache file (default: in the cache dir)"
    )
    t.add_argument("--tolerance", type=float, default=5e-3, help="max |dBMD| vs onnxruntime (default 5e-3)")
    t.add_argument(
        "--parity-cohort", type=Path, default=None, help="existing synthetic cohort for parity inputs"
    )
    t.add_argument("--rebuild", action="store_true", help="rebuild even if a valid engine is cached")
    t.add_argument("--device-id", type=int, default=0)
    return p


def _cmd_onnx(args: argparse.Namespace) -> int:
    from export.onnx_export import export_onnx

    if args.ensemble:
        from export.ensemble import export_ensemble

        if args.fp16:
            raise InputError("--fp16 is not supported with --ensemble")
        res = export_ensemble(
            args.checkpoint,
            args.out,
            opset=args.opset,
            parity_cohort=args.parity_cohort,
            tolerance=args.tolerance,
            log=lambda m: print(m, file=sys.stderr),
        )
        print(json.dumps(res, indent=2) if args.json else f"{res['path']}: {res['k']}-model ensemble")
        return 0

    res = export_onnx(
        args.checkpoint,
        args.out,
        opset=args.opset,
        fp16=args.fp16,
        parity_cohort=args.parity_cohort,
        tolerance=args.tolerance,
        fp16_tolerance=args.fp16_tolerance,
        exporter=args.exporter,
        log=lambda m: print(m, file=sys.stderr),
    )
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(
            f"{res.path}: {res.file_size_bytes / 1e6:.1f} MB, {res.exporter}, "
            f"export {res.export_time_s:.1f} s"
        )
        print(f"  parity: {res.parity.summary()}")
        if res.fp16_path and res.fp16_parity:
            print(f"{res.fp16_path}: {(res.fp16_file_size_bytes or 0) / 1e6:.1f} MB")
            print(f"  parity: {res.fp16_parity.summary()}")
    return 0


def _cmd_tensorrt(args: argparse.Namespace) -> int:
    from functools import partial

    from xbmd_batch.infer.model_file import open_model
    from xbmd_batch.infer.tensorrt.builder import get_or_build_engine
    from xbmd_batch.infer.tensorrt.engine_cache import describe
    from xbmd_batch.parity_feeds import make_reference_feeds

    model = open_model(args.onnx)
    # parity inputs are rendered only if an engine is really built (a cache hit needs none)
    feeds = partial(make_reference_feeds, cohort_dir=args.parity_cohort)
    rec = get_or_build_engine(
        model,
        precision=args.precision,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        min_batch=args.min_batch,
        cache_dir=args.cache_dir,
        timing_cache_path=args.timing_cache,
        parity_feeds=feeds,
        tolerance=args.tolerance,
        rebuild=args.rebuild,
        device_id=args.device_id,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(json.dumps({"built": rec.built, **describe(rec)}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from xbmd_batch.errors import TensorRTUnavailableError

    try:
        return _cmd_onnx(args) if args.command == "onnx" else _cmd_tensorrt(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TensorRTUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except XbmdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
