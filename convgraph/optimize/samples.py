"""What a calibration and held-out set risk: too few samples, a held-out set split off the calibration set,
and a calibration set that does not cover the held-out one (alike samples: crops of a few photos)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: Fewer calibration (held-out) samples than this get a warning that says what it risks.
FEW_CALIBRATION, FEW_HELDOUT = 16, 8
#: Held-out samples this many times farther from the nearest calibration sample than calibration samples
#: are from each other (medians, in the model's own features) make the calibration set too alike to cover them.
COVERAGE_RATIO = 2.0


#: Without --heldout, the allowed error is divided by this on the samples split off the calibration set: on
#: YOLOv8n (budget 0.99, class scores) the search's split-off crops judged 0.9909 where other photos gave
#: 0.972, about 3× the error (``benchmarks/bench_optimize.py --split``).
SPLIT_MARGIN = 3.0


def split_budget(metric: str, budget: float) -> float:
    """The budget held on held-out samples split off the calibration set: its allowed error ÷ SPLIT_MARGIN
    (1 − cosine or 1 − agreement; for SNR, the noise power: 10·log10(SPLIT_MARGIN) dB more)."""
    if metric == "snr":
        return budget + 10 * np.log10(SPLIT_MARGIN)
    return 1.0 - (1.0 - budget) / SPLIT_MARGIN


def sample_risks(calibration: int, heldout: int, split: bool) -> list[str]:
    """Warnings for a calibration or held-out set too small, or a held-out set split off the calibration
    set (alike to the data fitted on: the budget it passes says little about other data)."""
    out = []
    if calibration < FEW_CALIBRATION:
        out.append(f"only {calibration} calibration sample(s): the fits see few activations (a layer with many "
                   f"inputs per output can fit them and miss other data); give {FEW_CALIBRATION}+ varied ones "
                   "(other scenes and sources than the held-out set)")
    if heldout < FEW_HELDOUT:
        out.append(f"the budget is checked on {heldout} held-out sample(s) only: it may not hold on other "
                   f"inputs; give {FEW_HELDOUT}+ (--heldout), unlike the calibration set")
    if split:
        out.append("the held-out samples were split off the calibration set: they are like the data the fits "
                   "saw, and a budget held on them can fail on other data (seen: YOLOv8n class scores at "
                   "cosine 0.74 on other photos while crops of the calibration photos passed); give --heldout "
                   "from other sources")
    return out


def features(acts: Sequence[np.ndarray]) -> np.ndarray:
    """One vector per sample: a feature map's channels averaged over batch and space (N, C)."""
    return np.stack([a.reshape(a.shape[0], a.shape[1], -1).mean(axis=(0, 2)) for a in acts]).astype(np.float64)


def coverage(calib: np.ndarray, held: np.ndarray) -> float:
    """How much farther held-out samples lie from the nearest calibration sample than calibration samples lie
    from each other: the ratio of the medians of those nearest-neighbour distances, in features
    standardized by the calibration set's spread (``calib``, ``held``: (N, C) from :func:`features`)."""
    if len(calib) < 2 or len(held) == 0:
        return 1.0
    mu, sd = calib.mean(axis=0), calib.std(axis=0)
    sd = np.maximum(sd, 1e-3 * max(float(sd.mean()), 1e-12))  # a channel constant on the calibration set
    zc, zh = (calib - mu) / sd, (held - mu) / sd
    dc = np.linalg.norm(zc[:, None] - zc[None], axis=-1)
    np.fill_diagonal(dc, np.inf)
    within = float(np.median(dc.min(axis=1)))
    across = float(np.median(np.linalg.norm(zh[:, None] - zc[None], axis=-1).min(axis=1)))
    return across / within if within > 0 else (np.inf if across > 0 else 1.0)


def coverage_risk(ratio: float, tensor: str) -> str | None:
    """The warning for a coverage ratio (:func:`coverage`) over COVERAGE_RATIO, else None."""
    if not ratio > COVERAGE_RATIO:
        return None
    return (f"the calibration set does not cover the held-out set: held-out samples lie {ratio:.1f}× farther from "
            f"the nearest calibration sample than calibration samples from each other (in the model's features at "
            f"{tensor!r}); the calibration samples are alike (crops or frames of a few scenes?), so the fits see a "
            "narrow slice of the data and the budget holds only on shorter prefixes; calibrate on data as varied "
            "as what the model will see")
