"""XAttnBMD / ConcatBaseline: shapes, gradients, masking, attention, determinism, export (tiny configs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers.models import smallcnn_wide_cfg
from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig
from xbmd_batch.model import (
    Attention,
    ConcatBaseline,
    CrossLayer,
    ExportWrapper,
    KVUpdater,
    XAttnBMD,
    build_model,
    count_parameters,
    grid_size,
)

F = len(DEFAULT_SCHEMA.fields)
CAT_COLS = [i for i, k in enumerate(DEFAULT_SCHEMA.kinds) if k == "categorical"]
FUSIONS = ("xattn", "concat")


def tiny_cfg(fusion: str = "xattn", **kw: object) -> ModelConfig:
    base = dict(image_size=64, d_model=32, meta_hidden=16, head_hidden=16)
    base.update(kw)
    return ModelConfig.for_schema(DEFAULT_SCHEMA, fusion=fusion, **base)


def sensitive(model: nn.Module) -> nn.Module:
    """An untrained head is deliberately near-constant; widen its last layer so input effects are visible."""
    torch.manual_seed(123)
    nn.init.normal_(model.head.net[-1].weight, std=1.0)
    return model


def make_inputs(b: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 1, size, size, generator=g)
    meta = torch.randn(b, F, generator=g)
    for j in CAT_COLS:
        card = DEFAULT_SCHEMA.cardinalities[j]
        meta[:, j] = torch.randint(0, card, (b,), generator=g).float()
    mask = torch.ones(b, F)
    return image, meta, mask


@pytest.fixture(params=FUSIONS)
def model(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return sensitive(build_model(tiny_cfg(request.param))).eval()


def test_build_model_dispatch() -> None:
    assert isinstance(build_model(tiny_cfg("xattn")), XAttnBMD)
    assert isinstance(build_model(tiny_cfg("concat")), ConcatBaseline)
    with pytest.raises(ValueError, match="unknown fusion"):
        build_model(tiny_cfg("sum"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        build_model(tiny_cfg(d_model=30))


@pytest.mark.parametrize("b", [1, 3])
def test_output_shapes(model: nn.Module, b: int) -> None:
    image, meta, mask = make_inputs(b)
    with torch.no_grad():
        bmd = model(image, meta, mask)
        bmd2, att = model(image, meta, mask, return_attention=True)
    assert bmd.shape == (b,) and bmd.dtype == torch.float32
    assert att.shape == (b, F) and att.dtype == torch.float32
    assert torch.equal(bmd, bmd2)


@pytest.mark.parametrize("size", [64, 128, 224])
def test_image_sizes(size: int) -> None:
    m = build_model(tiny_cfg(image_size=size)).eval()
    assert m.image_encoder.n_tokens == (size // 32) ** 2 == grid_size(size) ** 2
    with torch.no_grad():
        bmd, att = m(*make_inputs(2, size=size), return_attention=True)
    assert bmd.shape == (2,) and att.shape == (2, F)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_parameter_gets_a_gradient(fusion: str) -> None:
    torch.manual_seed(0)
    m = build_model(tiny_cfg(fusion)).train()
    image, meta, mask = make_inputs(4)
    mask[0, :] = 0.0  # every field missing in one row (missing tokens), present in the others
    bmd = m(image, meta, mask)
    bmd.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_masking_changes_output_and_never_nan(model: nn.Module) -> None:
    image, meta, mask = make_inputs(3)
    with torch.no_grad():
        ref = model(image, meta, mask)
        for j in range(F):
            m = mask.clone()
            m[:, j] = 0.0
            out = model(image, meta, m)
            assert torch.isfinite(out).all()
            assert not torch.allclose(out, ref, rtol=0, atol=1e-6), f"masking field {j} did not change bmd"
        none = torch.zeros_like(mask)
        out, att = model(image, torch.zeros_like(meta), none, return_attention=True)
        assert torch.isfinite(out).all() and torch.isfinite(att).all()
        # a masked value is ignored, even a NaN that slipped through
        poisoned = meta.clone()
        poisoned[:, 1] = float("nan")
        m = mask.clone()
        m[:, 1] = 0.0
        clean = meta.clone()
        clean[:, 1] = 0.0
        assert torch.equal(model(image, poisoned, m), model(image, clean, m))


def test_categorical_index_is_rounded_and_clamped() -> None:
    torch.manual_seed(0)
    m = sensitive(build_model(tiny_cfg())).eval()
    j = DEFAULT_SCHEMA.names.index("smoking")  # 3 categories
    image, meta, mask = make_inputs(1)

    def run(v: float) -> torch.Tensor:
        x = meta.clone()
        x[0, j] = v
        with torch.no_grad():
            return m(image, x, mask)

    assert torch.equal(run(7.0), run(2.0))
    assert torch.equal(run(-3.0), run(0.0))
    assert torch.equal(run(0.6), run(1.0))
    assert not torch.equal(run(0.0), run(2.0))


def test_attention_rows_sum_to_one_and_depend_on_input() -> None:
    torch.manual_seed(0)
    m = build_model(tiny_cfg("xattn")).eval()
    image, meta, mask = make_inputs(3)
    mask[1, 2] = 0.0
    with torch.no_grad():
        _, att = m(image, meta, mask, return_attention=True)
    assert torch.allclose(att.sum(-1), torch.ones(3), atol=1e-5)
    assert (att >= 0).all()
    assert not torch.allclose(att[0], att[1])  # per-subject, not a constant


def test_baseline_attention_is_uniform() -> None:
    m = build_model(tiny_cfg("concat")).eval()
    with torch.no_grad():
        _, att = m(*make_inputs(2), return_attention=True)
    assert torch.allclose(att, torch.full((2, F), 1.0 / F))


def test_baseline_has_no_attention_parameters() -> None:
    base, xattn = build_model(tiny_cfg("concat")), build_model(tiny_cfg("xattn"))
    attn_types = (Attention, CrossLayer, KVUpdater)
    assert base.has_attention is False and xattn.has_attention is True
    assert not any(isinstance(mod, attn_types) for mod in base.modules())
    assert sum(isinstance(mod, Attention) for mod in xattn.modules()) == 2 * xattn.cfg.n_layers
    assert sum(isinstance(mod, KVUpdater) for mod in xattn.modules()) == 2 * (xattn.cfg.n_layers - 1)
    # the two share encoders and head: the baseline's parameters are a subset of XAttnBMD's
    base_names = {n for n, _ in base.named_parameters()}
    assert base_names < {n for n, _ in xattn.named_parameters()}


def test_creation_order_fixes_init_and_state_dict_keys() -> None:
    """Both models create the encoders, then the fusion, then LNs, head and wide path: with one seed the
    baseline's encoders are XAttnBMD's bit for bit, and its state-dict keys are XAttnBMD's in the same order
    without the fusion's (a reordering would change every seed's initialisation and the checkpoint layout)."""
    kw = dict(encoder="smallcnn", cnn_width=4, wide=True, wide_side=16)
    torch.manual_seed(5)
    xattn = build_model(tiny_cfg("xattn", **kw)).state_dict()
    torch.manual_seed(5)
    base = build_model(tiny_cfg("concat", **kw)).state_dict()
    fusion = ("layers.", "kv_meta.", "kv_img.")
    assert list(base) == [k for k in xattn if not k.startswith(fusion)]
    encoders = [k for k in base if k.startswith(("image_encoder.", "meta_encoder."))]
    assert encoders and all(torch.equal(base[k], xattn[k]) for k in encoders)
    keys = list(xattn)
    first_fusion = next(i for i, k in enumerate(keys) if k.startswith(fusion))
    assert keys[:first_fusion] == encoders  # encoders, then the fusion, then the pooled head and wide path
    assert keys[-1].startswith("wide.")


def test_eval_mode_is_deterministic(model: nn.Module) -> None:
    image, meta, mask = make_inputs(3)
    with torch.no_grad():
        a, att_a = model(image, meta, mask, return_attention=True)
        b, att_b = model(image, meta, mask, return_attention=True)
    assert torch.equal(a, b) and torch.equal(att_a, att_b)


def test_rows_are_independent_of_batch(model: nn.Module) -> None:
    """Dynamic batching must not change a subject's score (eval: BatchNorm uses running stats)."""
    image, meta, mask = make_inputs(3)
    with torch.no_grad():
        full = model(image, meta, mask)
        one = torch.cat([model(image[i : i + 1], meta[i : i + 1], mask[i : i + 1]) for i in range(3)])
    assert torch.allclose(full, one, atol=1e-5)


def test_export_wrapper_returns_both_outputs(model: nn.Module) -> None:
    image, meta, mask = make_inputs(2)
    with torch.no_grad():
        bmd, att = ExportWrapper(model)(image, meta, mask)
        ref_bmd, ref_att = model(image, meta, mask, return_attention=True)
    assert torch.equal(bmd, ref_bmd) and torch.equal(att, ref_att)


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_dynamo_onnx_export_matches_torch(fusion: str, tmp_path: Path) -> None:
    """Sanity check only (export/ owns the real exporter): dynamic batch, parity at batch 1 and 3."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from xbmd_batch.config import INPUT_NAMES, OUTPUT_NAMES

    torch.manual_seed(0)
    w = ExportWrapper(sensitive(build_model(tiny_cfg(fusion))).eval()).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    prog = torch.onnx.export(
        w,
        make_inputs(2),
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={name: {0: batch} for name in INPUT_NAMES},
        dynamo=True,
        opset_version=18,
        verbose=False,
    )
    path = tmp_path / "m.onnx"
    prog.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        image, meta, mask = make_inputs(b, seed=b)
        mask[0, 3] = 0.0
        meta[0, 3] = 0.0
        with torch.no_grad():
            ref = [t.numpy() for t in w(image, meta, mask)]
        got = sess.run(
            list(OUTPUT_NAMES), {"image": image.numpy(), "meta": meta.numpy(), "meta_mask": mask.numpy()}
        )
        for r, g in zip(ref, got, strict=True):
            assert g.shape == r.shape
            assert abs(g - r).max() < 1e-4


def test_pretrained_resnet34_loads_a_torchvision_state_dict_with_summed_stem(tmp_path) -> None:
    """--pretrained: a (fake, randomly initialised) torchvision resnet34 state dict; nothing is downloaded."""
    from torchvision.models import resnet34

    from xbmd_batch.model import load_pretrained_resnet34

    torch.manual_seed(1)
    ref = resnet34(weights=None).state_dict()
    path = tmp_path / "resnet34-imagenet.pth"
    torch.save(ref, path)
    cfg = ModelConfig.for_schema(DEFAULT_SCHEMA, image_size=64, d_model=32, n_layers=1)
    m = build_model(cfg)
    counts = load_pretrained_resnet34(m, str(path))
    assert counts["dropped"] == 2  # fc.weight, fc.bias
    enc = m.image_encoder
    torch.testing.assert_close(enc.stem[0].weight, ref["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(enc.stem[1].running_var, ref["bn1.running_var"])
    torch.testing.assert_close(enc.layers[3][2].conv2.weight, ref["layer4.2.conv2.weight"])
    torch.testing.assert_close(enc.layers[0][0].bn1.weight, ref["layer1.0.bn1.weight"])
    # a grey image through the 1-channel stem == the same image on all three RGB channels of the original
    x = torch.rand(2, 1, 16, 16)
    y1 = torch.nn.functional.conv2d(x, enc.stem[0].weight, stride=2, padding=3)
    y3 = torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), ref["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(y1, y3)
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not a torchvision resnet34"):
        load_pretrained_resnet34(m, str(bad))
    small = build_model(ModelConfig.for_schema(DEFAULT_SCHEMA, image_size=64, d_model=32, encoder="smallcnn"))
    with pytest.raises(ValueError, match="resnet34 encoder"):
        load_pretrained_resnet34(small, str(path))


def test_smallcnn_encoder_grid_and_size() -> None:
    cfg = ModelConfig.for_schema(DEFAULT_SCHEMA, image_size=64, d_model=32, n_layers=1, encoder="smallcnn")
    m = build_model(cfg).eval()
    assert m.image_encoder.n_tokens == 16  # 64 / 16 = 4 -> 4 x 4 tokens
    assert count_parameters(m) < 1_000_000
    out = m(torch.rand(2, 1, 64, 64), torch.zeros(2, len(DEFAULT_SCHEMA.fields)), torch.ones(2, 10))
    assert out.shape == (2,) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unknown encoder"):
        build_model(ModelConfig.for_schema(DEFAULT_SCHEMA, image_size=64, encoder="vit"))


@pytest.mark.parametrize(
    ("size", "side", "kernel", "pooled"), [(64, 64, 1, 64), (96, 64, 2, 48), (100, 64, 2, 50)]
)
def test_wide_path_pools_any_image_size(size: int, side: int, kernel: int, pooled: int) -> None:
    m = build_model(smallcnn_wide_cfg(size, side)).eval()
    assert m.wide.kernel == kernel and m.wide.n_features == pooled * pooled + 2 * F
    out = m(torch.rand(2, 1, size, size), torch.zeros(2, F), torch.ones(2, F))
    assert out.shape == (2,) and torch.isfinite(out).all()


def test_wide_gain_is_linear_plus_image_score_times_metadata_gain() -> None:
    """WidePath with wide_gain: linear(x) + score(x) * gain([meta, mask]); the gain term really acts."""
    cfg = tiny_cfg(encoder="smallcnn", cnn_width=4, wide=True, wide_side=16, wide_gain=True)
    m = build_model(cfg).eval()
    wide = m.wide
    torch.manual_seed(1)
    with torch.no_grad():
        for lin in (wide.linear, wide.score, wide.gain):
            lin.weight.normal_(0, 0.05)
            lin.bias.normal_(0, 0.5)
    image, meta, mask = make_inputs(4)
    mask[0, 2] = 0.0  # a missing field reads as 0 with mask 0
    with torch.no_grad():
        f = wide.features(image, meta, mask).double()
        lin = f @ wide.linear.weight.double().T + wide.linear.bias.double()
        z = f @ wide.score.weight.double().T + wide.score.bias.double()
        g = f[:, -2 * F :] @ wide.gain.weight.double().T + wide.gain.bias.double()
        want = (lin + z * g).squeeze(-1)
        got = wide(image, meta, mask).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - lin.squeeze(-1)).abs().min() > 1e-3  # without the gain term the output would differ
    assert set(dict(wide.named_children())) == {"linear", "score", "gain"}
    plain = build_model(tiny_cfg(encoder="smallcnn", cnn_width=4, wide=True, wide_side=16))
    assert plain.wide.score is None and plain.wide.gain is None  # old checkpoints: same state dict keys
    with pytest.raises(ValueError, match="wide_gain needs the wide path"):
        build_model(tiny_cfg(encoder="smallcnn", wide_gain=True))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_member_ensemble_is_the_calibrated_mean_of_independent_members(fusion: str) -> None:
    """n_members > 1: K networks sharing one wide path; eval output = calibration(mean of member outputs);
    training mode returns the K member outputs (each trained on its own loss)."""
    from xbmd_batch.model import MemberEnsemble, set_calibration

    torch.manual_seed(0)
    cfg = tiny_cfg(fusion, encoder="smallcnn", cnn_width=4, n_layers=1, wide=True, wide_side=16, n_members=3)
    m = build_model(cfg)
    assert isinstance(m, MemberEnsemble) and len(m.members) == 3 and m.has_attention == (fusion == "xattn")
    assert all(mem.wide is None for mem in m.members)  # one shared wide path
    for mem in m.members:
        sensitive(mem)
        torch.nn.init.normal_(mem.head.net[-1].weight, std=1.0)
    set_calibration(m, 0.01, 1.1)
    image, meta, mask = make_inputs(4)
    m.train()
    raws = m(image, meta, mask)
    assert raws.shape == (4, 3)
    m.eval()
    with torch.no_grad():
        bmd, att = m(image, meta, mask, return_attention=True)
        offset = m.wide(image, meta, mask)
        each = torch.stack([mem(image, meta, mask, wide_offset=offset) for mem in m.members], -1)
    assert (each[:, 0] - each[:, 1]).abs().max() > 1e-4  # independently initialised members
    torch.testing.assert_close(bmd, 0.01 + 1.1 * each.mean(-1), rtol=1e-5, atol=1e-5)
    assert att.shape == (4, F) and torch.allclose(att.sum(-1), torch.ones(4), atol=1e-5)
    one = build_model(tiny_cfg(fusion, encoder="smallcnn", n_members=1))
    assert not isinstance(one, MemberEnsemble)
    with pytest.raises(ValueError, match="n_members"):
        build_model(tiny_cfg(fusion, n_members=0))
