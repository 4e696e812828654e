"""Builders behind the score fixtures (tests/conftest.py): a tiny model (.pt and .onnx) and tiny cohorts.

A 64-pixel XAttn-BMD with d_model 32 and a 24-subject, 256-pixel synthetic cohort with some JPEG 2000 and
MONOCHROME1 files, so every score test runs in seconds on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SIZE = 64
__all__ = ["IMAGE_SIZE", "export_onnx", "make_cohort", "make_model"]


def make_model(path: Path, seed: int = 0) -> Path:
    """A tiny randomly initialised checkpoint (the bmd head gets a spread so predictions differ per image)."""
    import torch

    from xbmd_batch.checkpoint import save_checkpoint
    from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
    from xbmd_batch.model import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig.for_schema(
        DEFAULT_SCHEMA, image_size=IMAGE_SIZE, d_model=32, meta_hidden=32, head_hidden=32, dropout=0.0
    )
    model = build_model(cfg).eval()
    return save_checkpoint(path, model, cfg, DEFAULT_SCHEMA, PreprocessConfig(image_size=IMAGE_SIZE))


def export_onnx(ckpt: Path, out: Path) -> Path:
    """Minimal ONNX export (opset 17, dynamic batch, card embedded) for tests, independent of export/."""
    import onnx
    import torch

    from xbmd_batch.checkpoint import load_model
    from xbmd_batch.config import INPUT_NAMES, OUTPUT_NAMES
    from xbmd_batch.model import ExportWrapper
    from xbmd_batch.onnx_card import embed_card

    model, card = load_model(ckpt)
    f = card.model_config.n_fields
    args = (torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE), torch.zeros(2, f), torch.ones(2, f))
    torch.onnx.export(
        ExportWrapper(model).eval(),
        args,
        str(out),
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        dynamic_axes={n: {0: "batch"} for n in (*INPUT_NAMES, *OUTPUT_NAMES)},
        opset_version=17,
        dynamo=False,
    )
    from xbmd_batch.onnx_fp16 import pin_ir_version

    proto = pin_ir_version(onnx.load(str(out)))  # the project's IR version (D5), not the exporter's
    embed_card(proto, card)
    onnx.save(proto, str(out))
    return out


def make_cohort(out: Path, n: int = 24, seed: int = 1, **kw: object) -> Path:
    from xbmd_batch.synth import SynthConfig, generate_cohort

    # generator v1: these cohorts test I/O and resume, not science; the SIGINT leg of
    # test_kill9_then_resume_equals_uninterrupted failed 2 of 3 runs on the v2 cohort (issue #10 note, synth2)
    cfg = dict(n=n, size=256, seed=seed, j2k_fraction=0.25, mono1_fraction=0.3, workers=1)
    cfg["generator_version"] = 1
    cfg.update(kw)
    generate_cohort(out, SynthConfig(**cfg), progress=False)  # type: ignore[arg-type]
    return out
