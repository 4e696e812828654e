"""Contact sheet of SYNTHETIC radiographs (PIL only), so a person can see what the generator makes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Air (0.5th percentile) to bone (99.8th), squared: soft tissue mid-grey, the skin edge visible."""
    lo, hi = np.percentile(img, [0.5, 99.8])
    return (np.clip((img - lo) / max(hi - lo, 1e-9), 0, 1) ** 2.0 * 255).astype(np.uint8)


def contact_sheet(
    thumbs: list[np.ndarray], labels: list[str], path: Path, tile_h: int = 240, cols: int = 4
) -> Path:
    """Grid of thumbnails (bone bright) with one label each and a SYNTHETIC caption; returns the path."""
    if not thumbs:
        raise ValueError("no images for the contact sheet")
    tiles = []
    for t in thumbs:
        im = Image.fromarray(_to_uint8(np.asarray(t, dtype=np.float32)))
        w = max(1, round(im.width * tile_h / im.height))
        tiles.append(im.resize((w, tile_h), Image.Resampling.LANCZOS))
    tile_w = max(t.width for t in tiles)
    rows = (len(tiles) + cols - 1) // cols
    label_h, cap_h, pad = 18, 28, 4
    sheet = Image.new("L", (cols * (tile_w + pad) + pad, cap_h + rows * (tile_h + label_h + pad) + pad), 0)
    draw = ImageDraw.Draw(sheet)
    draw.text(
        (pad, 4), "SYNTHETIC hip radiographs (xbmd-batch synth) - not real patients", fill=255, font=_font(16)
    )
    for k, (tile, lab) in enumerate(zip(tiles, labels, strict=True)):
        r, c = divmod(k, cols)
        x, y = pad + c * (tile_w + pad), cap_h + r * (tile_h + label_h + pad)
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + tile_h + 2), lab, fill=230, font=_font(12))
        draw.text((x + 4, y + 4), "SYNTHETIC", fill=255, font=_font(12))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path
