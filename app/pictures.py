"""Pictures for the web app as RGB arrays (numpy only: no plotting library needed).

``codes_image`` draws the code sequence (time left to right, code index bottom to top);
``spectrogram_image`` a log-magnitude spectrogram. Both return ``[H, W, 3]`` uint8 arrays that
Gradio's Image component shows directly.
"""

from __future__ import annotations

import numpy as np

MAX_WIDTH = 1000
# Anchor colours of a dark-to-bright map (black, purple, red, yellow, white), in RGB.
_ANCHORS = np.array(
    [[0, 0, 4], [80, 18, 123], [183, 55, 121], [252, 137, 97], [252, 253, 191]], dtype=np.float64
)


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] ``[...]`` -> RGB uint8 ``[..., 3]``."""
    x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float64)), 0.0, 1.0)
    pos = x * (len(_ANCHORS) - 1)
    i = np.minimum(pos.astype(np.int64), len(_ANCHORS) - 2)
    frac = (pos - i)[..., None]
    rgb = _ANCHORS[i] * (1 - frac) + _ANCHORS[i + 1] * frac
    return np.rint(rgb).astype(np.uint8)


def _fit_width(image: np.ndarray, width: int) -> np.ndarray:
    """Resample columns of ``[H, W, ...]`` to ``width`` (nearest, keeps every column if
    ``W <= width`` by repeating; max over columns when shrinking, so thin marks survive)."""
    w = image.shape[1]
    if w == width:
        return image
    edges = np.linspace(0, w, width + 1)
    lo = np.minimum(np.floor(edges[:-1]).astype(np.int64), w - 1)
    hi = np.maximum(np.ceil(edges[1:]).astype(np.int64), lo + 1)
    if w < width:
        return image[:, lo]
    return np.stack([image[:, a:b].max(axis=1) for a, b in zip(lo, hi)], axis=1)


def codes_image(codes: np.ndarray, codebook_size: int, height: int = 256) -> np.ndarray:
    """The code sequence ``[F]`` as a ``[height, W, 3]`` picture: one bright cell per frame at
    its code's row (code 0 at the bottom)."""
    codes = np.asarray(codes, dtype=np.int64)
    frames = max(len(codes), 1)
    grid = np.zeros((codebook_size, frames), dtype=np.float64)
    if len(codes):
        grid[codebook_size - 1 - codes, np.arange(len(codes))] = 1.0
    rows = np.minimum((np.arange(height) * codebook_size) // height, codebook_size - 1)
    if codebook_size > height:  # several codes per pixel row: keep every mark
        edges = np.linspace(0, codebook_size, height + 1).astype(np.int64)
        grid = np.stack(
            [grid[a : max(b, a + 1)].max(axis=0) for a, b in zip(edges[:-1], edges[1:])]
        )
    else:
        grid = grid[rows]
    width = min(MAX_WIDTH, max(frames, 200))
    grid = _fit_width(grid, width)
    background = 0.08
    return colormap(background + (0.85 - background) * grid)


def spectrogram_image(
    wave: np.ndarray, sample_rate: int, height: int = 200, n_fft: int = 512
) -> np.ndarray:
    """Log-magnitude spectrogram of ``[n]`` as ``[height, W, 3]`` (low frequencies at the
    bottom, 80 dB of dynamic range below the loudest bin)."""
    wave = np.asarray(wave, dtype=np.float64)
    hop = max(1, sample_rate // 100)  # 10 ms
    if len(wave) < n_fft:
        wave = np.pad(wave, (0, n_fft - len(wave)))
    n = 1 + (len(wave) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n)[:, None]
    frames = wave[idx] * np.hanning(n_fft)[None, :]
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [n, bins]
    db = 10 * np.log10(power + 1e-12)
    db = (db - (db.max() - 80.0)) / 80.0
    image = db.T[::-1]  # [bins, n], low frequencies at the bottom
    rows = np.minimum((np.arange(height) * image.shape[0]) // height, image.shape[0] - 1)
    image = image[rows]
    return colormap(_fit_width(image, min(MAX_WIDTH, max(n, 200))))
