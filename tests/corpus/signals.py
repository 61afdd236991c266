"""Synthetic inputs with the correlations of real ones.

White noise is a poor stand-in for calibration data: its Hessians are close to the identity, and
there L-OBS has nothing to compensate with and reduces to magnitude pruning. Real images are
smooth and their channels correlated, real feature maps are mostly positive and mixed across
channels; these generators make inputs with that structure, cheaply and deterministically.
"""

from __future__ import annotations

import numpy as np


def smooth(rng, shape, scale=4, axes=(-2, -1)):
    """Noise drawn on a grid `scale` times coarser along `axes`, upsampled and box-blurred."""
    coarse = list(shape)
    for a in axes:
        coarse[a] = -(-shape[a] // scale)
    x = rng.standard_normal(coarse)
    for a in axes:
        x = np.repeat(x, scale, axis=a).take(range(shape[a]), axis=a)
        x = (x + np.roll(x, 1, a) + np.roll(x, -1, a)) / 3
    return x + 0.15 * rng.standard_normal(shape)


def images(rng, n, channels=3, size=16, channels_last=False):
    """Smooth images whose channels share most of their content, as the colours of a photo do."""
    shared = smooth(rng, (n, 1, size, size))
    x = shared + 0.4 * smooth(rng, (n, channels, size, size))
    x = x.astype(np.float32)
    return x.transpose(0, 2, 3, 1).copy() if channels_last else x


def features(rng, n, channels, size):
    """Feature maps as a backbone leaves them: smooth, mixed across channels, then SiLU."""
    base = smooth(rng, (n, max(2, channels // 4), size, size), scale=2)
    mix = rng.standard_normal((channels, base.shape[1])) / np.sqrt(base.shape[1])
    x = np.einsum("oc,nchw->nohw", mix, base) + 0.5
    return (x / (1 + np.exp(-x))).astype(np.float32)
