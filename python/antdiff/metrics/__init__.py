"""Sample-quality metrics: FID, improved precision/recall, Inception Score, feature extractors,
cached statistics.

Every result built from images records which network produced the features (key "features"),
because FIDs from different networks (or preprocessing) are not comparable.
"""

from __future__ import annotations

from typing import Any

from antdiff.metrics.features import (
    DIGITS_NAME,
    INCEPTION_URL,
    DigitsFeatures,
    FeatureExtractor,
    FidHelperInception,
    InceptionTorchScript,
    digits_images,
    find_fid_helper_model,
    find_inception,
    train_digits_classifier,
)
from antdiff.metrics.fid import as_features, feature_stats, fid_from_features, fid_from_stats
from antdiff.metrics.inception_score import inception_score
from antdiff.metrics.prdc import precision_recall
from antdiff.metrics.reference_stats import ReferenceStats, reference_stats

__all__ = [
    "DIGITS_NAME",
    "INCEPTION_URL",
    "DigitsFeatures",
    "FeatureExtractor",
    "FidHelperInception",
    "InceptionTorchScript",
    "ReferenceStats",
    "digits_images",
    "evaluate",
    "feature_stats",
    "fid_from_features",
    "fid_from_stats",
    "fid_vs_reference",
    "find_fid_helper_model",
    "find_inception",
    "inception_score",
    "precision_recall",
    "reference_stats",
    "train_digits_classifier",
]


def fid_vs_reference(
    fake_images: Any,
    reference: ReferenceStats,
    extractor: FeatureExtractor,
    *,
    allow_rank_deficient: bool = False,
    fake_features: Any = None,
) -> dict[str, Any]:
    """FID of ``fake_images [N, C, H, W]`` (in [-1, 1]) against cached reference statistics.

    ``fake_features``: ``extractor(fake_images)`` if the caller already has it (one pass of the
    network serves FID and precision / recall); ``fake_images`` may then be None (features
    gathered while sampling, the images not kept).

    Returns:
        ``{"fid", "n_fake", "n_real", "dim", "features"}``.
    """
    if reference.extractor != extractor.name:
        raise ValueError(
            f"reference statistics came from {reference.extractor!r} but the extractor is "
            f"{extractor.name!r}; FIDs across networks are meaningless"
        )
    if fake_images is None and fake_features is None:
        raise ValueError("fid_vs_reference needs fake_images or fake_features")
    feats = (extractor(fake_images) if fake_features is None
             else as_features(fake_features, "fake_features"))  # fmt: skip
    n_fake = int(fake_images.shape[0]) if fake_images is not None else len(feats)
    if feats.shape != (n_fake, extractor.dim):
        raise ValueError(
            f"fake_features must be [{n_fake}, {extractor.dim}] "
            f"(extractor(fake_images)), got {tuple(feats.shape)}"
        )
    mu, sigma = feature_stats(feats)
    fid = fid_from_stats(
        reference.mu,
        reference.sigma,
        mu,
        sigma,
        n1=reference.n,
        n2=n_fake,
        allow_rank_deficient=allow_rank_deficient,
    )
    return {
        "fid": fid,
        "n_fake": n_fake,
        "n_real": reference.n,
        "dim": extractor.dim,
        "features": extractor.name,
    }


def evaluate(
    real_images: Any,
    fake_images: Any,
    extractor: FeatureExtractor,
    *,
    k: int = 3,
    block: int = 2048,
    allow_rank_deficient: bool = False,
) -> dict[str, Any]:
    """FID and improved precision/recall (k-NN balls) of fake against real images.

    Returns:
        ``{"fid", "precision", "recall", "k", "n_real", "n_fake", "dim", "features"}``.
    """
    real = extractor(real_images)
    fake = extractor(fake_images)
    out = precision_recall(
        real, fake, k=k, block=block, features=extractor.name, device=extractor.device
    )
    out["fid"] = fid_from_features(real, fake, allow_rank_deficient=allow_rank_deficient)
    out["dim"] = extractor.dim
    return out
