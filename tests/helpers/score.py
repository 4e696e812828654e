"""Builders behind the score fixtures (tests/conftest.py): a tiny model (.pt and .onnx) and tiny cohorts.

A 64-pixel XAttn-BMD with d_model 32 and a 24-subject, 256-pixel synthetic cohort with some JPEG 2000 and
MONOCHROME1 files, so every score test runs in seconds on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SIZE = 64
__all__ = ["IMAGE_SIZE", "export_onnx", "make_cohort", "make_model", "plant_mismatches"]


def make_model(path: Path, seed: int = 0, training_summary: dict | None = None) -> Path:
    """A tiny randomly initialised checkpoint (the bmd head gets a spread so predictions differ per image);
    ``training_summary`` goes into its card as is (e.g. ``oof_residuals`` for the interval columns)."""
    import torch

    from xbmd_batch.checkpoint import save_checkpoint
    from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
    from xbmd_batch.model import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig.for_schema(
        DEFAULT_SCHEMA, image_size=IMAGE_SIZE, d_model=32, meta_hidden=32, head_hidden=32, dropout=0.0
    )
    model = build_model(cfg).eval()
    return save_checkpoint(
        path, model, cfg, DEFAULT_SCHEMA, PreprocessConfig(image_size=IMAGE_SIZE), training_summary
    )


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


def plant_mismatches(cohort: Path) -> Path:
    """Plant one member of every bucket of the plan in a cohort copy (its meta.csv is appended to): META row
    without image, image without META, duplicate SOPInstanceUID, two subjects with two images, non-DICOM,
    hidden, a truncated (decode failure) and a junk-header file. Returns the DICOM folder."""
    import shutil

    import pydicom

    dicom = cohort / "dicom"
    files = sorted(p for p in dicom.rglob("*") if p.is_file() and not p.name.startswith("."))
    with (cohort / "meta.csv").open("a") as f:
        f.write("EXTRA0001,F,75,75,160,60,,never,1,50,50\n")  # META row without image
    ds = pydicom.dcmread(files[0])
    ds.PatientID = "NOMETA01"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dicom / "nometa.dcm")  # image without META
    (dicom / "zz_copy").mkdir()
    shutil.copy(files[1], dicom / "zz_copy" / files[1].name)  # duplicate SOPInstanceUID
    for i, name in ((2, "zz_second_view.dcm"), (5, "aa_second_view.dcm")):  # two subjects with 2 images
        d = pydicom.dcmread(files[i])
        d.SOPInstanceUID = pydicom.uid.generate_uid()
        d.save_as(dicom / name)
    (dicom / "notes.txt").write_text("reading list")  # non-DICOM
    shutil.copy(files[3], dicom / ".hidden_copy.dcm")  # hidden
    raw = files[4].read_bytes()
    bad = dicom / "zz_truncated.dcm"  # decode failure
    d = pydicom.dcmread(files[4])
    d.SOPInstanceUID = pydicom.uid.generate_uid()
    d.save_as(bad)
    bad.write_bytes(bad.read_bytes()[: len(raw) // 2])
    (dicom / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)  # header failure
    return dicom
