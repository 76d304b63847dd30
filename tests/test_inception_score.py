"""Inception Score: the formula against an independent float64 implementation, its closed-form
cases, the class probabilities of the Inception file's output layer, and score()'s use of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from antdiff.metrics import FeatureExtractor, InceptionTorchScript, inception_score


def is_numpy(probs: np.ndarray, splits: int) -> tuple[float, float]:
    """The published formula, part by part: exp(mean_x sum_y p log(p / p_part(y)))."""
    n, scores = len(probs), []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("n, classes, splits", [(103, 17, 10), (40, 1008, 1), (25, 3, 7)])
def test_inception_score_matches_the_formula(n: int, classes: int, splits: int) -> None:
    rng = np.random.default_rng(n)
    probs = rng.dirichlet(np.full(classes, 0.3), size=n)  # peaked rows, no exact zeros
    mean, std = inception_score(probs, splits)
    want = is_numpy(probs, splits)
    assert mean == pytest.approx(want[0], rel=1e-12) and std == pytest.approx(want[1], abs=1e-12)
    # the parts are consecutive rows: shuffling the samples changes the parts' scores
    if splits > 1:
        assert inception_score(probs[rng.permutation(n)], splits)[1] != pytest.approx(std)


def test_inception_score_closed_forms() -> None:
    """Confident predictions spread evenly over C classes in every part score C (zeros in the
    rows add nothing, no NaN); identical rows score 1; a torch tensor is taken as it is."""
    c, per = 8, 5
    one_hot = np.tile(np.eye(c), (per * 2, 1))  # 2 parts of per * c rows, each uniform over c
    assert inception_score(one_hot, 2) == pytest.approx((c, 0.0), abs=1e-12)
    same = np.tile([0.5, 0.25, 0.25], (30, 1))
    assert inception_score(torch.tensor(same), 3) == pytest.approx((1.0, 0.0), abs=1e-12)


@pytest.mark.parametrize(
    "probs, splits, message",
    [
        (np.full((5, 4), 0.25), 10, "needs at least 10 samples; got 5"),
        (np.full((20, 4), 0.3), 10, "sum to 1"),
        (np.full((20, 4), np.nan), 10, "finite"),
        (np.full(20, 0.5), 2, "must be \\[N, classes\\]"),
        (np.full((20, 4), 0.25), 0, "splits must be an int >= 1"),
        (np.full((20, 4), 0.25), True, "splits must be an int >= 1"),
    ],
)
def test_inception_score_bad_input(probs, splits, message) -> None:
    with pytest.raises(ValueError, match=message):
        inception_score(probs, splits)


class FakeClassifierInception(torch.nn.Module):
    """The interface of inception-2015-12-05.pt with its 1008-way ``output`` layer: features,
    or the softmax of the logits with or without the output bias (``no_output_bias``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.layers = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 2048)
        )
        self.output = torch.nn.Linear(2048, 1008)
        with torch.no_grad():
            self.output.weight.mul_(30.0)  # peaked probabilities
            self.output.bias.normal_()  # large enough to matter

    def forward(self, img: torch.Tensor, return_features: bool = False,
                use_fp16: bool = False, no_output_bias: bool = False) -> torch.Tensor:  # fmt: skip
        x = torch.nn.functional.interpolate(img.float(), size=(299, 299), mode="bilinear")
        features = self.layers((x - 128.0) / 128.0).reshape(-1, 2048)
        if return_features:
            return features
        if no_output_bias:
            logits = torch.nn.functional.linear(features, self.output.weight)
        else:
            logits = self.output(features)
        return torch.softmax(logits, 1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_class_probabilities_are_the_networks_own_without_bias(tmp_path: Path) -> None:
    """class_probabilities(features) equals the module's own no_output_bias=True output on the
    same pixels (one pass serves FID and IS), differs from the biased softmax, and a file
    without the output layer says the IS needs NVIDIA's file."""
    from tests.test_metrics import FakeInception

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(FakeClassifierInception()).save(str(path))
    ext = InceptionTorchScript(path, device="cpu")
    x = torch.rand(6, 3, 12, 10) * 2 - 1
    pixels = ((x + 1) * 127.5).clamp(0, 255).round()
    probs = ext.class_probabilities(ext(x))
    assert ext.has_classifier and probs.shape == (6, 1008) and probs.dtype == np.float64
    with torch.no_grad():
        want = ext.net(pixels, no_output_bias=True).double().numpy()
        biased = ext.net(pixels).double().numpy()
    np.testing.assert_allclose(probs, want, atol=2e-6)
    assert np.abs(probs - biased).max() > 1e-2
    other = tmp_path / "plain" / path.name
    other.parent.mkdir()
    torch.jit.script(FakeInception()).save(str(other))
    plain = InceptionTorchScript(other, device="cpu")
    assert not plain.has_classifier
    with pytest.raises(ValueError, match="no 2048-input `output` layer"):
        plain.class_probabilities(np.zeros((2, 2048)))


class ClassifyingPixels(FeatureExtractor):
    """Pixels as features, with a fixed 3-class softmax head: stands in for the Inception
    network in score()."""

    has_classifier = True

    def __init__(self) -> None:
        self.name, self.dim = "classifying pixels", 16
        self.head = np.random.default_rng(2).normal(size=(16, 3)) * 4

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)

    def class_probabilities(self, features) -> np.ndarray:
        z = np.asarray(features) @ self.head
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def test_score_adds_the_inception_score_of_the_samples(tmp_path: Path) -> None:
    """score() reports the samples' IS over 10 parts from the features it already has, beside
    FID and precision / recall; a network without a classifier (digits, fid-helper) adds none."""
    from antdiff.evaluate import score

    g = torch.Generator().manual_seed(0)
    np.save(tmp_path / "ref.npy", (torch.rand(40, 1, 4, 4, generator=g) * 2 - 1).numpy())
    fake = torch.rand(30, 1, 4, 4, generator=g) * 2 - 1
    ext = ClassifyingPixels()
    out = score(fake, ext, tmp_path / "ref.npy", cache_dir=tmp_path / "c")
    want = is_numpy(ext.class_probabilities(fake.reshape(30, 16).double().numpy()), 10)
    assert out["inception_score_splits"] == 10
    assert out["inception_score"] == pytest.approx(want[0], rel=1e-12)
    assert out["inception_score_std"] == pytest.approx(want[1], abs=1e-12)
    assert 1.0 < out["inception_score"] < 3.0
    ext.has_classifier = False
    plain = score(fake, ext, tmp_path / "ref.npy", cache_dir=tmp_path / "c")
    assert not any(k.startswith("inception_score") for k in plain)
    assert plain["fid"] == out["fid"]


def test_eval_cli_prints_the_inception_score(tmp_path: Path, capsys, monkeypatch) -> None:
    """`antdiff eval` prints the IS beside FID when the result has one (Inception features),
    and nothing of it otherwise; the JSON holds every key."""
    import json

    import antdiff.evaluate as ev
    from antdiff.cli import main as cli_main

    res = {"fid": 1.5, "precision": 0.25, "recall": 0.75, "num": 7, "features": "inc",
           "inception_score": 12.3456, "inception_score_std": 0.5}  # fmt: skip
    monkeypatch.setattr(ev, "evaluate_checkpoint", lambda ckpt, num, **kw: dict(res))
    argv = ["eval", "--ckpt", str(tmp_path), "--num", "7", "--device", "cpu", "--json"]
    assert cli_main([*argv, str(tmp_path / "a.json")]) == 0
    assert "recall 0.7500  IS 12.346  (7 samples" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["inception_score_std"] == 0.5
    del res["inception_score"], res["inception_score_std"]
    assert cli_main([*argv, str(tmp_path / "b.json")]) == 0
    assert "recall 0.7500  (7 samples" in capsys.readouterr().out
