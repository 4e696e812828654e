"""Model-only cost of a K-fold ensemble graph vs one member (onnxruntime CPU, same exporter, one process).

The K fold models of RUN (``fold_*.pt``) are exported twice: member 0 alone and all K as one ensemble graph
(``export.ensemble``). Both run on the same random inputs at one batch size, alternating repetitions so a
shared machine's load hits both alike; reported: images/s of each (median of the repetitions) and the ratio.
Without --run, K quick-preset models with random weights stand in (cost does not depend on weight values).

    python benchmarks/ensemble_cost.py --run RUN --threads 1 --json benchmarks/results/ensemble_cost.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import emit_json  # noqa: E402
from _machine import cpu_model, load_average  # noqa: E402


def random_run(folder: Path, k: int, preset: str) -> Path:
    import numpy as np_
    import torch

    from train.__main__ import model_config_for
    from train.presets import get_preset
    from xbmd_batch.checkpoint import save_checkpoint
    from xbmd_batch.config import DEFAULT_SCHEMA, PreprocessConfig
    from xbmd_batch.model import build_model

    hp = get_preset(preset)
    cfg = model_config_for(DEFAULT_SCHEMA, "xattn", hp, np_.array([0.70, 0.84]))  # the preset's model
    for i in range(k):
        torch.manual_seed(i)
        m = build_model(cfg).eval()
        save_checkpoint(
            folder / f"fold_{i}.pt", m, cfg, DEFAULT_SCHEMA, PreprocessConfig(image_size=hp.image_size)
        )
    return folder


def _encoder(fold: Path) -> str:
    from xbmd_batch.checkpoint import load_model

    return str(load_model(fold)[1].model_config.encoder)


def export_single(fold: Path, out: Path) -> None:
    import torch

    from xbmd_batch.checkpoint import load_model
    from xbmd_batch.model import ExportWrapper

    m, card = load_model(fold)
    c = card.model_config
    args = (
        torch.zeros(2, c.in_chans, c.image_size, c.image_size),
        torch.zeros(2, c.n_fields),
        torch.ones(2, c.n_fields),
    )
    names = list(card.input_names) + list(card.output_names)
    torch.onnx.export(
        ExportWrapper(m).eval(),
        args,
        str(out),
        dynamo=False,
        input_names=list(card.input_names),
        output_names=list(card.output_names),
        dynamic_axes={n: {0: "batch"} for n in names},
        opset_version=18,
        do_constant_folding=True,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run", type=Path, default=None, help="training run with fold_*.pt (default: random quick)"
    )
    p.add_argument("--k", type=int, default=5, help="members when --run is not given")
    p.add_argument("--preset", default="quick", help="architecture of the random members (train/presets.py)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parity-cohort", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    import onnxruntime as ort

    from export.ensemble import export_ensemble, fold_checkpoints

    load0 = load_average()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        run = a.run if a.run is not None else random_run(tmp, a.k, a.preset)
        folds = fold_checkpoints(run)
        encoder = _encoder(folds[0])
        export_single(folds[0], tmp / "single.onnx")
        export_ensemble(run, tmp / "ensemble.onnx", parity_cohort=a.parity_cohort)
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        so.inter_op_num_threads = 1
        sess = {n: ort.InferenceSession(str(tmp / f"{n}.onnx"), so, providers=["CPUExecutionProvider"])
                for n in ("single", "ensemble")}  # fmt: skip
        inp = sess["single"].get_inputs()
        rng = np.random.default_rng(0)
        b = a.batch_size
        s = inp[0].shape[-1]
        f = inp[1].shape[-1]
        feeds = {
            inp[0].name: rng.standard_normal((b, 1, s, s)).astype(np.float32),
            inp[1].name: rng.standard_normal((b, f)).astype(np.float32),
            inp[2].name: np.ones((b, f), np.float32),
        }
        times: dict[str, list[float]] = {"single": [], "ensemble": []}
        for n in sess:  # warm-up
            sess[n].run(None, feeds)
        for _ in range(a.reps):
            for n in sess:
                t0 = time.perf_counter()
                sess[n].run(None, feeds)
                times[n].append(time.perf_counter() - t0)
    ips = {n: b / float(np.median(t)) for n, t in times.items()}
    result = {
        "command": " ".join(sys.argv),
        "k": len(folds),
        "models": str(a.run)
        if a.run
        else f"random-weight {a.preset}-preset models (cost does not depend on weights)",
        "encoder": encoder,
        "backend": f"onnxruntime {ort.__version__} CPU, intra_op_threads={a.threads}",
        "batch_size": b,
        "reps": a.reps,
        "images_per_s": {n: round(v, 2) for n, v in ips.items()},
        "ensemble_time_ratio": round(ips["single"] / ips["ensemble"], 2),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None},
        "load_avg_at_start": load0,
        "load_avg_at_end": load_average(),
    }
    emit_json(result, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
