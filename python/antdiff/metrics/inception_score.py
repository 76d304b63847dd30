"""Inception Score: exp(E_x KL(p(y | x) || p(y))), averaged over splits of the samples.

The class probabilities are those of the original TF implementation, which the StyleGAN and ADM
evaluators reproduce: a softmax over the network's 1008 logits computed WITHOUT the output
layer's bias. :meth:`antdiff.metrics.InceptionTorchScript.class_probabilities` forms them from
the pool3 features that FID uses (one pass of the network serves both). Each of ``splits``
consecutive parts of the samples (``splits`` = 10, as reported in the literature) gets its own
marginal p(y); the score is the mean over the parts, with their standard deviation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def inception_score(probs: Any, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` parts of the Inception Score of ``probs`` [N, classes].

    Part i holds rows ``i N // splits`` to ``(i + 1) N // splits``. Computed in float64;
    a probability of exactly 0 adds 0 (x log x -> 0), not NaN.

    Raises:
        ValueError: ``probs`` is not a finite [N, classes] array of rows summing to 1 (within
            1e-3), or has fewer rows than ``splits``.
    """
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits must be an int >= 1, got {splits!r}")
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    if p.dim() != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must be [N, classes] with classes >= 2; got {list(p.shape)}")
    if p.shape[0] < splits:
        raise ValueError(
            f"the Inception Score over {splits} splits needs at least {splits} samples; got "
            f"{p.shape[0]}"
        )
    if not torch.isfinite(p).all() or (p < 0).any() or (p.sum(1) - 1).abs().max() > 1e-3:
        raise ValueError("probs must be finite, non-negative rows that sum to 1 (softmax outputs)")
    n, scores = p.shape[0], []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(0, keepdim=True)
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)).sum(1)
        scores.append(float(torch.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))
