"""Image-like synthetic inputs: what a vision model sees, made from a seed, with no data files.

Uniform noise is not an image: fed to a text detector it yields a map of ~2e-5 everywhere, on which any
two models agree. These images follow the dead-leaves model of natural images (overlapping flat discs
whose sizes follow a power law: flat regions, sharp edges, a ~1/f spectrum) and carry rows of
text-like strokes (dark glyphs on light bands), so detectors, OCR and classifiers respond to them.
"""

from __future__ import annotations

import numpy as np

#: Discs per image (the dead-leaves model): one per this many pixels, within DISCS.
PIXELS_PER_DISC = 500
DISCS = (20, 300)


def _glyph(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A character-like mask: a few strokes (verticals, bars) of width ~h/6."""
    s = max(1, h // 6)
    g = np.zeros((h, w), bool)
    if rng.random() < 0.8:
        g[:, :s] = True
    if rng.random() < 0.5:
        g[:, -s:] = True
    for row in (0, h // 2, h - s):
        if rng.random() < 0.45:
            g[row:row + s, :] = True
    if rng.random() < 0.3:  # a diagonal
        for y in range(h):
            x = int(y * (w - s) / max(1, h - 1))
            g[y, x:x + s] = True
    return g if g.any() else np.pad(np.ones((h, s), bool), ((0, 0), (0, w - s)))


def natural_image(rng: np.random.Generator, channels: int, height: int, width: int) -> np.ndarray:
    """One image, float32 [channels, height, width] in [0, 1]."""
    img = np.empty((channels, height, width), np.float32)
    img[:] = rng.random((channels, 1, 1))
    rmin, rmax = max(1.0, min(height, width) / 100), max(1.5, min(height, width) / 4)
    discs = int(min(max(height * width // PIXELS_PER_DISC, DISCS[0]), DISCS[1]))
    for _ in range(discs):  # dead leaves: radii with density ~ r^-3, as in natural scenes
        r = (rmin ** -2 + rng.random() * (rmax ** -2 - rmin ** -2)) ** -0.5
        cy, cx = rng.random() * height, rng.random() * width
        y0, y1 = int(max(0, cy - r)), int(min(height, cy + r + 1))
        x0, x1 = int(max(0, cx - r)), int(min(width, cx + r + 1))
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[:, y0:y1, x0:x1][:, inside] = rng.random((channels, 1))
    _text(rng, img)
    img += rng.normal(0.0, 0.01, img.shape).astype(np.float32)  # sensor noise
    return np.clip(img, 0.0, 1.0, out=img)


def _text(rng: np.random.Generator, img: np.ndarray) -> None:
    """Rows of dark glyphs on light bands, a few per image, at several sizes."""
    channels, height, width = img.shape
    if height < 16 or width < 16:
        return
    for _ in range(int(rng.integers(2, 6))):
        th = int(rng.integers(max(4, height // 60), max(5, height // 12)))
        if 2 * th >= height:
            continue
        y = int(rng.integers(0, height - 2 * th))
        x = int(rng.integers(0, max(1, width // 3)))
        end = int(min(width, x + rng.integers(max(2, width // 4), width)))
        img[:, y:y + 2 * th, x:end] = 0.85 + 0.15 * rng.random((channels, 1, 1))
        ink = 0.15 * rng.random()
        cx = x + th // 2
        while cx < end - th:
            cw = int(rng.integers(max(2, th // 2), th + 1))
            mask = _glyph(rng, th, cw)
            img[:, y + th // 2:y + th // 2 + th, cx:cx + cw][:, mask] = ink
            cx += cw + max(1, th // 4) + (int(rng.integers(th // 2, 2 * th)) if rng.random() < 0.2 else 0)
