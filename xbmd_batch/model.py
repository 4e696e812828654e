"""XAttn-BMD (arXiv 2511.14604) and its concatenation baseline, all modules in one file.

The paper gives the blocks (ResNet34 image encoder, MLP metadata encoder, 3 layers x 4 heads of bidirectional
cross-attention with a layer-wise fusion weight and a key-value updater, late concatenation, regression head)
but no equations. The equations below are our choices; ``ModelConfig`` holds every size. Notation: B batch,
D = d_model, H = n_heads, Dh = D / H, F = number of metadata fields, N = g * g image tokens.

Image tokens
    encoder "resnet34": torchvision resnet34 trunk (``weights=None``; ``load_pretrained_resnet34`` loads
    user-supplied ImageNet weights, the RGB stem summed to ``in_chans``) up to layer4:
    feature map [B, 512, g, g], g = image_size / 32 (ceil per stride-2 stage; 2, 4, 7 at 64, 128, 224).
    encoder "smallcnn": 4 stages, each conv3x3(stride 2)-BN-ReLU-conv3x3-BN-ReLU, widths w, 2w, 4w, 8w
    (w = cnn_width): feature map [B, 8w, g, g], g = image_size / 16 (4, 8 at 64, 128).
    I_0 = flatten(map) W_img + P,  W_img in R^{C x D},  P in R^{N x D} a learned positional embedding.

Metadata tokens (one per field f, schema order)
    numeric f:      e_f = x_f * w_f + b_f                         (w_f, b_f in R^D learned)
    categorical f:  e_f = E_f[clamp(round(x_f), 0, K_f - 1)]      (E_f in R^{K_f x D}; out of range: clamped)
    missing:        e_f = u_f if mask_f == 0                      (u_f in R^D, a learned "missing" token)
    t_f = e_f + c_f                                               (c_f in R^D, field-identity embedding)
    M_0 = t + MLP(LN(t))        (per-token residual MLP, D -> meta_hidden -> D)
    Missing fields are *not* removed from attention: their learned token carries "this field is missing", so a
    subject with every field missing still gets a finite prediction and well-defined attention.

Attention (one module, used in both directions, lucidrains style)
    Attn(X, C) = softmax(Q K^T / sqrt(Dh)) V W_o,  Q = X W_q, K = C W_k, V = C W_v, split into H heads.
    It returns its attention weights A in [B, H, N_query, N_context] (before dropout); every row sums to 1.

Layer l = 1..L (pre-LayerNorm, residual written at the call site, both directions read the layer's inputs)
    I_l' = I_{l-1} + sigmoid(alpha_l) * Attn_l^{i<-m}(LN(I_{l-1}), LN(C^m_{l-1}))   image attends to metadata
    M_l' = M_{l-1} + sigmoid(beta_l)  * Attn_l^{m<-i}(LN(M_{l-1}), LN(C^i_{l-1}))   metadata attends to image
    I_l  = I_l' + FFN_l^i(LN(I_l')),  M_l = M_l' + FFN_l^m(LN(M_l'))                FFN: D -> 4D -> D, GELU
    Layer-wise fusion weight: alpha_l, beta_l are learned scalars (init 0, so each gate starts at 0.5);
    they set how much of the other modality enters each stream at each depth.

Key-value updater (between layers; L - 1 updaters per direction)
    The context tokens start as the streams themselves: C^m_0 = M_0, C^i_0 = I_0. After layer l < L:
    G   = sigmoid([C^m_{l-1}, M_l] W_g + b_g)                      (per token and channel, W_g in R^{2D x D})
    C^m_l = (1 - G) * C^m_{l-1} + G * (M_l W_u)                    (W_u in R^{D x D})
    and the same for C^i with the image stream. The keys/values an image query sees are thus a gated blend of
    the field tokens seen so far and the freshly image-informed metadata tokens, so field identity survives
    (field-level attention stays interpretable) while the context is refined layer by layer.

Head (late concatenation)
    z = [mean_n LN(I_L)_n, mean_f LN(M_L)_f] in R^{2D}
    raw = bmd_mean + bmd_std * (W_2 GELU(W_1 z + b_1) + b_2)   (W_1: 2D -> head_hidden, W_2: head_hidden -> 1)
    bmd = calib_intercept + calib_slope * raw                  (xbmd_batch.calibration; identity until fitted)
    With ``wide`` (CPU preset) bmd_mean is replaced by a linear "wide" path:
    raw = w . [avgpool_k(image) flattened, meta (missing -> 0), meta_mask] + b + bmd_std * (W_2 ... + b_2),
    k = ceil(image_size / wide_side); (w, b) are fitted by ridge on the training part before the network
    trains (``train.engine.fit_wide``), then frozen: the network learns what a linear model misses.
    With ``wide_gain`` the wide path also lets the metadata modulate how image density maps to BMD:
    wide = w . x + b + (s . x + s_0) * (v . [meta, meta_mask] + v_0),  x = [pooled image, meta, meta_mask];
    the fit (``train.engine.fit_wide``) makes s . x + s_0 a ridge image score z and regresses y on its
    cross-fitted values and [meta, mask, z * meta, z * mask], i.e. bmd = c + b . m + (a + u . m) z.
    (Synthetic generator v2: the image shows rho = m_fat * bmd with a body-fat contrast factor m_fat of BMI,
    age and sex; an additive model cannot divide by it.)
    The calibration pair comes from ModelConfig and sits in non-persistent buffers: state dicts are unchanged
    (old checkpoints load), the exported ONNX graph carries it as constants, and every backend returns the
    calibrated BMD. ``set_calibration`` writes it into a trained model.

Field attention (output ``field_attention``, [B, F])
    The image->metadata weights A_l^{i<-m}, averaged over heads, image query tokens and layers:
    a_f = 1/(L H N) sum_{l,h,n} A_l[h, n, f]. Each A row sums to 1, so every a row sums to 1.
    ConcatBaseline has no attention: it returns the uniform 1/F and ``has_attention = False``.

Export: no Python branching on batch size or data, reshapes via ``unflatten``/``flatten`` (no baked batch),
fp32 throughout, no nn.MultiheadAttention. ``ExportWrapper`` always returns ``(bmd, field_attention)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xbmd_batch.config import ModelConfig

RESNET_OUT_CHANNELS = 512  # resnet34 layer4 width


def grid_size(image_size: int, n_stages: int = 5) -> int:
    """Side of the encoder's output grid: n stride-2 stages of ceil(n / 2) (resnet34: 5, image_size // 32)."""
    g = image_size
    for _ in range(n_stages):
        g = (g + 1) // 2
    return g


SMALLCNN_STAGES = 4


def _check_config(cfg: ModelConfig) -> None:
    """Fail at construction with a clear message rather than with a shape error mid-forward."""
    if cfg.d_model % cfg.n_heads != 0:
        raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})")
    n = len(cfg.field_names)
    if n == 0:
        raise ValueError("the model needs at least one metadata field")
    if len(cfg.field_kinds) != n or len(cfg.field_cardinalities) != n:
        raise ValueError("field_names, field_kinds and field_cardinalities must have the same length")
    for name, kind, card in zip(cfg.field_names, cfg.field_kinds, cfg.field_cardinalities, strict=True):
        if kind not in ("numeric", "categorical"):
            raise ValueError(f"field {name!r}: unknown kind {kind!r}")
        if kind == "categorical" and card < 1:
            raise ValueError(f"categorical field {name!r} needs at least one category")
    if cfg.image_size < 32:
        raise ValueError(f"image_size must be >= 32 (got {cfg.image_size})")
    if cfg.encoder not in ("resnet34", "smallcnn"):
        raise ValueError(f"unknown encoder {cfg.encoder!r}; expected 'resnet34' or 'smallcnn'")
    if cfg.n_members < 1:
        raise ValueError(f"n_members must be >= 1 (got {cfg.n_members})")
    if cfg.wide_gain and not cfg.wide:
        raise ValueError("wide_gain needs the wide path (wide=True)")
    if cfg.encoder == "smallcnn" and cfg.cnn_width < 1:
        raise ValueError(f"cnn_width must be >= 1 (got {cfg.cnn_width})")


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallCNNTrunk(nn.Module):
    """``stem`` (first stage) + ``layers`` (the other three), the same attribute names as the resnet trunk."""

    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__()
        w = [width * m for m in (1, 2, 4, 8)]
        self.stem = nn.Sequential(*_conv_bn_relu(in_chans, w[0], 2), *_conv_bn_relu(w[0], w[0], 1))
        self.layers = nn.Sequential(
            *[
                nn.Sequential(*_conv_bn_relu(w[i - 1], w[i], 2), *_conv_bn_relu(w[i], w[i], 1))
                for i in range(1, SMALLCNN_STAGES)
            ]
        )
        self.out_channels = w[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class ImageEncoder(nn.Module):
    """CNN trunk (resnet34 or smallcnn) -> grid tokens projected to d_model + learned position embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.encoder == "smallcnn":
            small = SmallCNNTrunk(cfg.in_chans, cfg.cnn_width)
            self.stem, self.layers = small.stem, small.layers
            channels, stages = small.out_channels, SMALLCNN_STAGES
        else:
            from torchvision.models import resnet34

            trunk = resnet34(weights=None)
            trunk.conv1 = nn.Conv2d(cfg.in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(trunk.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
            self.layers = nn.Sequential(trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
            channels, stages = RESNET_OUT_CHANNELS, 5
        self.n_tokens = grid_size(cfg.image_size, stages) ** 2
        self.proj = nn.Linear(channels, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(1, self.n_tokens, cfg.d_model) * 0.02)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(image))  # (B, 512, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, N, 512), N = g * g
        return self.proj(x) + self.pos  # (B, N, D)


class MetadataEncoder(nn.Module):
    """One token per field (numeric/categorical/missing + field identity), then a per-token residual MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        kinds = cfg.field_kinds
        num_idx = [i for i, k in enumerate(kinds) if k == "numeric"]
        cat_idx = [i for i, k in enumerate(kinds) if k == "categorical"]
        cards = [cfg.field_cardinalities[i] for i in cat_idx]
        self.n_num, self.n_cat = len(num_idx), len(cat_idx)
        self.register_buffer(
            "num_idx", torch.tensor(num_idx, dtype=torch.long, device="cpu"), persistent=False
        )
        self.register_buffer(
            "cat_idx", torch.tensor(cat_idx, dtype=torch.long, device="cpu"), persistent=False
        )
        # concatenated [numeric tokens, categorical tokens] -> schema order
        order = num_idx + cat_idx
        self.register_buffer(
            "to_schema",
            torch.tensor([order.index(i) for i in range(len(kinds))], device="cpu"),
            persistent=False,
        )
        if self.n_num:
            self.num_w = nn.Parameter(torch.randn(self.n_num, d) * 0.02)
            self.num_b = nn.Parameter(torch.randn(self.n_num, d) * 0.02)
        if self.n_cat:
            # one table for all categorical fields; field j's rows start at cat_offset[j]
            self.cat_emb = nn.Embedding(sum(cards), d)
            nn.init.normal_(self.cat_emb.weight, std=0.02)
            offsets = [sum(cards[:j]) for j in range(len(cards))]
            self.register_buffer(
                "cat_offset", torch.tensor(offsets, dtype=torch.long, device="cpu"), persistent=False
            )
            self.register_buffer(
                "cat_max",
                torch.tensor([c - 1 for c in cards], dtype=torch.float32, device="cpu"),
                persistent=False,
            )
        self.missing = nn.Parameter(torch.randn(len(kinds), d) * 0.02)
        self.field_emb = nn.Parameter(torch.randn(len(kinds), d) * 0.02)
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.meta_hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.meta_hidden, d)
        )

    def forward(self, meta: torch.Tensor, meta_mask: torch.Tensor) -> torch.Tensor:
        present = (meta_mask > 0.5).unsqueeze(-1)  # (B, F, 1)
        meta = torch.where(present.squeeze(-1), meta, torch.zeros_like(meta))  # missing/NaN -> 0
        parts = []
        if self.n_num:
            x = meta.index_select(1, self.num_idx).unsqueeze(-1)  # (B, Fn, 1)
            parts.append(x * self.num_w + self.num_b)  # (B, Fn, D)
        if self.n_cat:
            x = meta.index_select(1, self.cat_idx)  # (B, Fc)
            x = torch.minimum(torch.clamp(torch.round(x), min=0.0), self.cat_max)  # valid index per field
            parts.append(self.cat_emb(x.long() + self.cat_offset))  # (B, Fc, D)
        tok = torch.cat(parts, dim=1).index_select(1, self.to_schema)  # (B, F, D) in schema order
        tok = torch.where(present, tok, self.missing) + self.field_emb  # (B, F, D)
        return tok + self.mlp(self.ln(tok))  # (B, F, D)


class Attention(nn.Module):
    """Multi-head attention of queries ``x`` over ``context``; returns (output, weights [B, H, Nq, Nc])."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.scale = 1.0 / math.sqrt(d // cfg.n_heads)
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_k = nn.Linear(d, d, bias=False)
        self.to_v = nn.Linear(d, d, bias=False)
        self.to_out = nn.Linear(d, d)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.out_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.n_heads
        q = self.to_q(x).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, H, Nq, Dh)
        k = self.to_k(context).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, H, Nc, Dh)
        v = self.to_v(context).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, H, Nc, Dh)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)  # (B, H, Nq, Nc)
        out = torch.matmul(self.attn_drop(attn), v)  # (B, H, Nq, Dh)
        out = out.transpose(1, 2).flatten(2)  # (B, Nq, D)
        return self.out_drop(self.to_out(out)), attn


class FeedForward(nn.Module):
    """Pre-LN position-wise MLP; the residual is added by the caller."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.net = nn.Sequential(
            nn.LayerNorm(d),
            nn.Linear(d, 4 * d),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(4 * d, d),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossLayer(nn.Module):
    """One bidirectional cross-attention layer with a learned fusion weight per direction."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ln_img_q, self.ln_meta_kv = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ln_meta_q, self.ln_img_kv = nn.LayerNorm(d), nn.LayerNorm(d)
        self.img_from_meta = Attention(cfg)
        self.meta_from_img = Attention(cfg)
        # layer-wise fusion weights: sigmoid(0) = 0.5 at init
        self.alpha = nn.Parameter(torch.zeros(1))  # image <- metadata
        self.beta = nn.Parameter(torch.zeros(1))  # metadata <- image
        self.ffn_img = FeedForward(cfg)
        self.ffn_meta = FeedForward(cfg)

    def forward(
        self, img: torch.Tensor, meta: torch.Tensor, ctx_meta: torch.Tensor, ctx_img: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a_img, attn = self.img_from_meta(self.ln_img_q(img), self.ln_meta_kv(ctx_meta))  # (B, N, D)
        a_meta, _ = self.meta_from_img(self.ln_meta_q(meta), self.ln_img_kv(ctx_img))  # (B, F, D)
        img = img + torch.sigmoid(self.alpha) * a_img
        meta = meta + torch.sigmoid(self.beta) * a_meta
        img = img + self.ffn_img(img)
        meta = meta + self.ffn_meta(meta)
        return img, meta, attn  # attn: (B, H, N, F)


class KVUpdater(nn.Module):
    """Gated refinement of one stream's context tokens from that stream's freshly updated tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.gate = nn.Linear(2 * d, d)
        self.update = nn.Linear(d, d)

    def forward(self, ctx: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([ctx, fresh], dim=-1)))  # (B, T, D)
        return (1.0 - g) * ctx + g * self.update(fresh)  # (B, T, D)


class WidePath(nn.Module):
    """Linear model of the average-pooled image and the metadata (a BMD offset), optionally with a metadata
    gain on an image score (``wide_gain``); see the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.wide_side < 1:
            raise ValueError(f"wide_side must be >= 1 (got {cfg.wide_side})")
        # the smallest integer pooling factor giving at most wide_side pixels a side (any image size works:
        # 96 px with wide_side 64 pools by 2 to 48 x 48; a ragged last row/column is dropped by avg_pool2d)
        self.kernel = -(-cfg.image_size // cfg.wide_side)
        side = cfg.image_size // self.kernel
        self.n_meta = 2 * len(cfg.field_names)  # metadata values (missing -> 0) and the presence mask
        self.n_features = side * side * cfg.in_chans + self.n_meta
        self.linear = nn.Linear(self.n_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, cfg.bmd_mean)
        self.score: nn.Linear | None = None
        self.gain: nn.Linear | None = None
        if cfg.wide_gain:
            # z = score(x): an image score; g = gain(m): a metadata-driven gain on it (both zero at init, so
            # an unfitted gain path is the plain linear one)
            self.score = nn.Linear(self.n_features, 1)
            self.gain = nn.Linear(self.n_meta, 1)
            for lin in (self.score, self.gain):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def features(self, image: torch.Tensor, meta: torch.Tensor, meta_mask: torch.Tensor) -> torch.Tensor:
        x = image if self.kernel == 1 else nn.functional.avg_pool2d(image, self.kernel)
        present = meta_mask > 0.5
        meta = torch.where(present, meta, torch.zeros_like(meta))
        return torch.cat([x.flatten(1), meta, meta_mask], dim=1)  # (B, n_features)

    def forward(self, image: torch.Tensor, meta: torch.Tensor, meta_mask: torch.Tensor) -> torch.Tensor:
        f = self.features(image, meta, meta_mask)  # (B, n_features)
        out = self.linear(f).squeeze(-1)  # (B,)
        if self.score is not None and self.gain is not None:
            z = self.score(f).squeeze(-1)  # (B,) image score
            g = self.gain(f[:, -self.n_meta :]).squeeze(-1)  # (B,) metadata gain
            out = out + g * z
        return out


class RegressionHead(nn.Module):
    """Late concatenation [pooled image, pooled metadata] -> BMD in g/cm^2."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * cfg.d_model, cfg.head_hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.head_hidden, 1),
        )
        nn.init.normal_(self.net[-1].weight, std=0.02)  # start near bmd_mean, not at it (gradients flow)
        nn.init.zeros_(self.net[-1].bias)
        self.bmd_mean = cfg.bmd_mean
        self.bmd_std = cfg.bmd_std
        self.register_buffer(
            "calib_intercept", torch.tensor(float(cfg.calib_intercept), device="cpu"), persistent=False
        )
        self.register_buffer(
            "calib_slope", torch.tensor(float(cfg.calib_slope), device="cpu"), persistent=False
        )

    def forward(self, z: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        base = self.bmd_mean if offset is None else offset  # (B,) from the wide path
        raw = base + self.bmd_std * self.net(z).squeeze(-1)  # (B,)
        return self.calib_intercept + self.calib_slope * raw  # (B,)


def _wide_offset(
    wide: WidePath | None,
    image: torch.Tensor,
    meta: torch.Tensor,
    mask: torch.Tensor,
    given: torch.Tensor | None,
) -> torch.Tensor | None:
    """The wide path's offset: ``given`` (training passes it from the un-augmented image; an ensemble passes
    its shared wide path's to its members) or computed here."""
    if given is not None:
        return given
    return None if wide is None else wide(image, meta, mask)


class _TwoStreamModel(nn.Module):
    """What XAttnBMD and ConcatBaseline share: the two encoders, the subclass's fusion (``_build_fusion``,
    ``fuse``), then LN + mean pooling of each stream, the late-concatenation head and the wide path.

    Submodules are created in that order (encoders, fusion, LNs, head, wide): the order fixes the random
    initialisation per seed and the state-dict key order, so keep it.
    """

    has_attention: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.meta_encoder = MetadataEncoder(cfg)
        self._build_fusion(cfg)
        self.ln_img = nn.LayerNorm(cfg.d_model)
        self.ln_meta = nn.LayerNorm(cfg.d_model)
        self.head = RegressionHead(cfg)
        self.wide = WidePath(cfg) if cfg.wide else None

    def _build_fusion(self, cfg: ModelConfig) -> None:
        """Create the fusion's submodules (none for the concatenation baseline)."""

    def fuse(
        self, img: torch.Tensor, met: torch.Tensor, meta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(image tokens, metadata tokens, field attention [B, F] or None when the model has none)."""
        return img, met, None

    def forward(
        self,
        image: torch.Tensor,
        meta: torch.Tensor,
        meta_mask: torch.Tensor,
        return_attention: bool = False,
        wide_offset: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        img = self.image_encoder(image)  # (B, N, D)
        met = self.meta_encoder(meta, meta_mask)  # (B, F, D)
        img, met, attention = self.fuse(img, met, meta)  # (B, N, D), (B, F, D), (B, F) or None
        z = torch.cat([self.ln_img(img).mean(dim=1), self.ln_meta(met).mean(dim=1)], dim=-1)  # (B, 2D)
        bmd = self.head(z, _wide_offset(self.wide, image, meta, meta_mask, wide_offset))  # (B,)
        if return_attention:
            if attention is None:
                attention = torch.ones_like(meta) / meta.shape[-1]  # (B, F) uniform: no attention to report
            return bmd, attention
        return bmd


class XAttnBMD(_TwoStreamModel):
    """ResNet34 + metadata tokens fused by bidirectional cross-attention (see the module docstring)."""

    has_attention: bool = True

    def _build_fusion(self, cfg: ModelConfig) -> None:
        self.layers = nn.ModuleList(CrossLayer(cfg) for _ in range(cfg.n_layers))
        self.kv_meta = nn.ModuleList(KVUpdater(cfg) for _ in range(cfg.n_layers - 1))
        self.kv_img = nn.ModuleList(KVUpdater(cfg) for _ in range(cfg.n_layers - 1))

    def fuse(
        self, img: torch.Tensor, met: torch.Tensor, meta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx_meta, ctx_img = met, img
        attn_sum = torch.zeros_like(meta)  # (B, F)
        for i, layer in enumerate(self.layers):
            img, met, attn = layer(img, met, ctx_meta, ctx_img)
            attn_sum = attn_sum + attn.mean(dim=(1, 2))  # (B, H, N, F) -> (B, F)
            if i < len(self.kv_meta):
                ctx_meta = self.kv_meta[i](ctx_meta, met)
                ctx_img = self.kv_img[i](ctx_img, img)
        return img, met, attn_sum / len(self.layers)  # (B, N, D), (B, F, D), (B, F)


class ConcatBaseline(_TwoStreamModel):
    """The paper's baseline: the same two encoders, pooled features concatenated, no cross-attention."""

    has_attention: bool = False


class OutputCalibration(nn.Module):
    """``bmd = calib_intercept + calib_slope * raw`` from non-persistent buffers (the ensemble's; a single
    network's RegressionHead carries the same two buffers)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.register_buffer(
            "calib_intercept", torch.tensor(float(cfg.calib_intercept), device="cpu"), persistent=False
        )
        self.register_buffer(
            "calib_slope", torch.tensor(float(cfg.calib_slope), device="cpu"), persistent=False
        )

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.calib_intercept + self.calib_slope * raw


class MemberEnsemble(nn.Module):
    """``n_members`` networks of one fusion kind sharing one wide path; output = calibrated member mean.

    raw_k = wide(x) + bmd_std * head_k(z_k)   (member k: own encoders, fusion and head; own initialisation)
    bmd   = calib_intercept + calib_slope * mean_k raw_k;  field_attention = mean_k of the members' attention
    In training mode ``forward`` returns the members' raw outputs [B, K] so that each member is fitted on its
    own loss (``train.engine`` flattens them against the repeated labels): K independently trained networks,
    averaged at inference, which removes most of a small network's seed-to-seed variance. One ONNX graph.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _check_config(cfg)
        import dataclasses

        self.cfg = cfg
        member_cfg = dataclasses.replace(
            cfg, n_members=1, wide=False, wide_gain=False, calib_intercept=0.0, calib_slope=1.0
        )
        cls = XAttnBMD if cfg.fusion == "xattn" else ConcatBaseline
        self.has_attention = cls.has_attention
        self.members = nn.ModuleList(cls(member_cfg) for _ in range(cfg.n_members))
        self.wide = WidePath(cfg) if cfg.wide else None
        self.head = OutputCalibration(cfg)

    def forward(
        self,
        image: torch.Tensor,
        meta: torch.Tensor,
        meta_mask: torch.Tensor,
        return_attention: bool = False,
        wide_offset: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        offset = _wide_offset(self.wide, image, meta, meta_mask, wide_offset)  # (B,) or None
        outs, atts = [], []
        for member in self.members:
            raw, att = member(image, meta, meta_mask, return_attention=True, wide_offset=offset)
            outs.append(raw)
            atts.append(att)
        raws = torch.stack(outs, dim=-1)  # (B, K)
        if self.training and not return_attention:
            return raws  # each member gets its own loss
        bmd = self.head(raws.mean(dim=-1))  # (B,)
        if return_attention:
            return bmd, torch.stack(atts, dim=0).mean(dim=0)  # (B,), (B, F)
        return bmd


class ExportWrapper(nn.Module):
    """Always returns ``(bmd [B], field_attention [B, F])``, in ``config.OUTPUT_NAMES`` order, for export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, image: torch.Tensor, meta: torch.Tensor, meta_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bmd, field_attention = self.model(image, meta, meta_mask, return_attention=True)
        return bmd, field_attention


def build_model(cfg: ModelConfig) -> XAttnBMD | ConcatBaseline | MemberEnsemble:
    """The model ``cfg.fusion`` names: "xattn" -> XAttnBMD, "concat" -> ConcatBaseline; with
    ``n_members`` > 1 a MemberEnsemble of that many."""
    if cfg.fusion not in ("xattn", "concat"):
        raise ValueError(f"unknown fusion {cfg.fusion!r}; expected 'xattn' or 'concat'")
    if cfg.n_members > 1:
        return MemberEnsemble(cfg)
    if cfg.fusion == "xattn":
        return XAttnBMD(cfg)
    if cfg.fusion == "concat":
        return ConcatBaseline(cfg)
    raise ValueError(f"unknown fusion {cfg.fusion!r}; expected 'xattn' or 'concat'")


def load_pretrained_resnet34(model: nn.Module, path: str) -> dict[str, int]:
    """Load a user-supplied torchvision ImageNet resnet34 state dict (a file; nothing is downloaded).

    The RGB stem ``conv1.weight`` [64, 3, 7, 7] is summed over its colour channels (a grey image fed to all
    three channels gives exactly that response) and repeated to ``in_chans``; ``fc.*`` is dropped. Loaded with
    ``weights_only=True``. Returns counts of loaded tensors; raises ValueError on a mismatching file.
    """
    if model.cfg.encoder != "resnet34":
        raise ValueError(f"--pretrained needs the resnet34 encoder (this model has {model.cfg.encoder!r})")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or "conv1.weight" not in sd:
        raise ValueError(f"{path}: not a torchvision resnet34 state dict (no conv1.weight)")
    enc = model.image_encoder
    conv1 = sd["conv1.weight"]
    if tuple(conv1.shape) != (64, 3, 7, 7):
        raise ValueError(f"{path}: conv1.weight has shape {tuple(conv1.shape)}, expected (64, 3, 7, 7)")
    stem_w = conv1.sum(dim=1, keepdim=True).repeat(1, model.cfg.in_chans, 1, 1) / model.cfg.in_chans
    mapped: dict[str, torch.Tensor] = {"stem.0.weight": stem_w}
    for k, v in sd.items():
        if k.startswith("bn1."):
            mapped["stem.1." + k[4:]] = v
        elif k.startswith("layer"):
            i = int(k[5]) - 1
            mapped[f"layers.{i}.{k[7:]}"] = v
    own = enc.state_dict()
    bad = [k for k, v in mapped.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensor(s) do not fit resnet34, e.g. {bad[:3]}")
    missing = [k for k in own if (k.startswith(("stem.", "layers."))) and k not in mapped]
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} resnet34 tensor(s), e.g. {missing[:3]}")
    enc.load_state_dict(mapped, strict=False)
    return {"loaded": len(mapped), "dropped": sum(1 for k in sd if k.startswith("fc."))}


def set_calibration(model: nn.Module, intercept: float, slope: float) -> ModelConfig:
    """Write the output calibration into a built model; returns its config with the same pair (to save).

    The pair replaces (does not compose with) what the model had; pass the composed map to chain fits.
    """
    import dataclasses

    head = model.head
    head.calib_intercept.fill_(float(intercept))
    head.calib_slope.fill_(float(slope))
    model.cfg = dataclasses.replace(model.cfg, calib_intercept=float(intercept), calib_slope=float(slope))
    return model.cfg


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count (for the model card and benchmarks)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
