"""The report's numbers: pure functions over counts and embeddings (no files, no models)."""

from __future__ import annotations

import math

import numpy as np

LT_THRESHOLD = 500  # SELECT's LT@500: classes holding fewer images than this
TOP_SHARE = 0.05  # SELECT's LS@5pct: the share of images held by the top 5% of classes
CMMD_SIGMA = 10.0  # Jayasumana et al. 2024 (CMMD): RBF bandwidth on CLIP embeddings
CMMD_SCALE = 1000.0  # ... and the scale they report it at
CLIPSCORE_BINS = np.linspace(0.0, 100.0, 201)  # 0.5-wide bins: a fixed-size histogram


def class_statistics(counts: list[int], target: int) -> dict:
    """SELECT's class statistics over the requested classes (a class with no image counts)."""
    n = len(counts)
    c = np.sort(np.asarray(counts, np.int64))[::-1]
    total = int(c.sum())
    top = max(1, math.ceil(TOP_SHARE * n)) if n else 0
    return {
        "classes": n,
        "covered": int((c >= 1).sum()),
        "coverage": float((c >= 1).mean()) if n else 0.0,
        "lt500": int((c < LT_THRESHOLD).sum()),
        "short_of_target": int((c < target).sum()),
        "ls5pct": float(c[:top].sum() / total) if total else 0.0,
        "top_classes": top,
        "min": int(c.min()) if n else 0,
        "median": float(np.median(c)) if n else 0.0,
        "max": int(c.max()) if n else 0,
        "samples": total,
        "target": target,
    }


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def clip_scores(images: np.ndarray, text: np.ndarray) -> np.ndarray:
    """CLIPScore as torchmetrics reports it: 100 * max(cosine(image, text), 0)."""
    return 100.0 * np.maximum(images @ text, 0.0)


def intra_class(x: np.ndarray, duplicate_cosine: float, block: int = 2048) -> tuple[float, int]:
    """Mean pairwise cosine within one class (LAIONet's diversity measure; lower is more
    diverse) and how many of its images have a near duplicate (cosine >= the threshold) in it.
    Blocks of rows keep the similarity matrix small for large classes."""
    n = len(x)
    if n < 2:
        return float("nan"), 0
    s = x.sum(axis=0, dtype=np.float64)
    mean = (float(s @ s) - float((x.astype(np.float64) ** 2).sum())) / (n * (n - 1))
    duplicated = 0
    for i in range(0, n, block):
        sims = x[i : i + block] @ x.T
        rows = np.arange(len(sims))
        sims[rows, rows + i] = -1.0  # not itself
        duplicated += int((sims >= duplicate_cosine).any(axis=1).sum())
    return mean, duplicated


def _mean_kernel(x: np.ndarray, y: np.ndarray, gamma: float, block: int = 512) -> float:
    total = 0.0
    xx = (x.astype(np.float64) ** 2).sum(1)
    yy = (y.astype(np.float64) ** 2).sum(1)
    for i in range(0, len(x), block):
        d = xx[i : i + block, None] + yy[None, :] - 2.0 * (x[i : i + block] @ y.T)
        total += float(np.exp(-gamma * np.maximum(d, 0.0)).sum())
    return total / (len(x) * len(y))


def cmmd(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA) -> float:
    """CMMD (Jayasumana et al. 2024): the maximum mean discrepancy between two sets of CLIP
    embeddings under an RBF kernel, x1000 as the paper reports it. 0 for identical sets."""
    if len(x) == 0 or len(y) == 0:
        return float("nan")
    gamma = 1.0 / (2.0 * sigma**2)
    value = _mean_kernel(x, x, gamma) + _mean_kernel(y, y, gamma) - 2.0 * _mean_kernel(x, y, gamma)
    return CMMD_SCALE * max(value, 0.0)


def histogram_quantile(hist: np.ndarray, edges: np.ndarray, q: float) -> float:
    """A quantile read off a histogram (to the bin's width): what streaming allows."""
    total = hist.sum()
    if total == 0:
        return float("nan")
    i = int(np.searchsorted(np.cumsum(hist), q * total))
    return float((edges[i] + edges[i + 1]) / 2)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between rows of packed 64-bit hashes (uint8, 8 per row)."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1)
