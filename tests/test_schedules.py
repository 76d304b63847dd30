from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from antdiff.schedules import Schedule, as_schedule, cosine_schedule, linear_schedule, make_schedule


def test_linear_matches_ddpm_definition():
    s = linear_schedule(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-9, atol=1e-15)
    assert s.T == 1000 and len(s) == 1000


def test_cosine_matches_formula():
    T, off = 1000, 0.008
    f = np.cos((np.arange(T + 1) / T + off) / (1 + off) * np.pi / 2) ** 2
    betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    np.testing.assert_allclose(cosine_schedule(T).alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)


def test_scaled_linear_is_latent_diffusions_schedule():
    """The LDM configs' betas: linear in sqrt(beta) from 0.0015 to 0.0195 (T = 1000)."""
    betas = np.array([(0.0015**0.5 + i / 999 * (0.0195**0.5 - 0.0015**0.5)) ** 2
                      for i in range(1000)])  # fmt: skip
    s = make_schedule("scaled_linear", 1000)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    assert s.log_snr[0] == pytest.approx(6.5008, abs=1e-4)  # the paper's Fig. 1 LDM range
    assert s.log_snr[-1] == pytest.approx(-8.8574, abs=1e-4)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_snr_and_log_snr_consistent_and_decreasing(name):
    s = make_schedule(name, 500)
    a = s.alphas_cumprod
    np.testing.assert_allclose(s.snr, a / (1 - a), rtol=1e-12)
    np.testing.assert_allclose(np.exp(s.log_snr), s.snr, rtol=1e-9)
    assert np.all(np.diff(s.log_snr) < 0)


def test_any_alphas_cumprod_plugs_in():
    a = torch.linspace(0.999, 0.01, 50, dtype=torch.float64)
    s = as_schedule(a)
    assert s.T == 50
    np.testing.assert_allclose(s.alphas_cumprod, a.numpy())
    assert Schedule.from_dict(s.to_dict()).alphas_cumprod.tolist() == s.alphas_cumprod.tolist()


@pytest.mark.parametrize(
    "bad, match",
    [
        ([0.9, 0.95], "decreasing"),
        ([1.0, 0.5], r"\(0, 1\)"),
        ([0.5, float("nan")], "NaN"),
        ([[0.5]], "1-D"),
    ],
)
def test_bad_alphas_cumprod(bad, match):
    with pytest.raises(ValueError, match=match):
        Schedule(np.asarray(bad))


def test_bad_names_and_T():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="T must be"):
        linear_schedule(0)


def test_diffusers_name_of_the_cosine_schedule():
    """'squaredcos_cap_v2' (diffusers' name of the same schedule) was an unknown schedule."""
    a = make_schedule("squaredcos_cap_v2").alphas_cumprod
    np.testing.assert_array_equal(a, cosine_schedule(1000).alphas_cumprod)
    np.testing.assert_array_equal(as_schedule("squaredcos_cap_v2").alphas_cumprod, a)


def test_a_linear_schedule_too_short_names_the_shortest_that_works():
    """T = 10 said only "beta would reach 1": the message now names T >= 21 (beta_end = 0.02
    rescaled by 1000 / T stays below 1 from there) and the cosine schedule."""
    from antdiff.schedules import linear_schedule

    with pytest.raises(ValueError, match=r"use T >= 21, or the cosine schedule"):
        linear_schedule(10)
    with pytest.raises(ValueError, match=r"use T >= 21"):
        linear_schedule(20)
    assert linear_schedule(21).T == 21


def test_scaled_linear_rescales_its_endpoints_for_other_T():
    """scaled_linear at T != 1000: betas from beta_start * 1000 / T to beta_end * 1000 / T,
    linear in sqrt(beta) (the suite checks T = 1000 only, where the scale is 1)."""
    from antdiff.schedules import scaled_linear_schedule

    for T in (250, 500, 2000):  # noqa: N806
        b = scaled_linear_schedule(T).betas
        s = 1000.0 / T
        np.testing.assert_allclose(b[[0, -1]], [0.0015 * s, 0.0195 * s], rtol=1e-9)
        np.testing.assert_allclose(np.diff(np.sqrt(b), 2), 0.0, atol=1e-12)


def test_an_array_that_never_reaches_noise_is_warned_of():
    """The per-step alphas (a diffusers scheduler's ``.alphas``) pass every check of an
    alphas_cumprod (decreasing, inside (0, 1)) but end near 1: warned, with the fix."""
    betas = np.linspace(1e-4, 0.02, 1000)
    with pytest.warns(UserWarning, match=r"ends at 0.98.*scheduler.alphas_cumprod") as said:
        as_schedule(1.0 - betas)
    assert said[0].filename == __file__  # the caller's line
    with pytest.warns(UserWarning, match="ends at"):
        as_schedule(torch.tensor(1.0 - betas))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real arrays: no warning
        as_schedule(np.cumprod(1.0 - betas))
        as_schedule(cosine_schedule(1000).alphas_cumprod)
        Schedule(1.0 - betas)  # a Schedule is taken as it is


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "at least one entry"),
        ([0.5, 0.0], r"strictly inside \(0, 1\).*Clip the schedule"),
        ([1.0, 0.5], r"strictly inside \(0, 1\).*Clip the schedule"),
        ([0.5, 0.5], "strictly decreasing"),
        ([0.9, 0.5, 0.5, 0.1], "strictly decreasing"),
    ],
)
def test_bad_alphas_cumprod_at_the_edges(bad, match):
    """The bounds are strict: an empty array, alpha_bar = 0 (log-SNR -inf) and two equal
    neighbours (beta = 0) are refused too, and the range error names the fix."""
    with pytest.raises(ValueError, match=match):
        Schedule(np.asarray(bad, dtype=np.float64))


def test_schedule_keeps_its_own_read_only_copy():
    """The caller's array stays writable and a later write to it leaves the schedule alone."""
    arr = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 10))
    want = arr.copy()
    s = Schedule(arr)
    arr[0] = 0.5  # the caller's array was not frozen
    np.testing.assert_array_equal(s.alphas_cumprod, want)
    with pytest.raises(ValueError, match="read-only"):
        s.alphas_cumprod[0] = 0.5


def test_scaled_linear_too_short_is_named():
    """beta_end * 1000 / T = 0.0195 * 1000 / T reaches 1 for T <= 19: refused by name, not by
    the generic (0, 1) range check of a cumprod gone negative."""
    from antdiff.schedules import scaled_linear_schedule

    for T in (1, 10, 19):  # noqa: N806
        with pytest.raises(ValueError, match=f"T={T} is too small for the scaled_linear"):
            scaled_linear_schedule(T)
    assert scaled_linear_schedule(20).T == 20  # 0.0195 * 50 = 0.975 < 1


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "squaredcos_cap_v2"])
def test_make_schedule_uses_T(name):
    s = make_schedule(name, 250)
    assert s.T == 250
    if name == "linear":  # DDPM's endpoints rescaled by 1000 / T = 4
        betas = np.linspace(4e-4, 0.08, 250)
        np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    if name in ("cosine", "squaredcos_cap_v2"):
        np.testing.assert_array_equal(s.alphas_cumprod, cosine_schedule(250).alphas_cumprod)


@pytest.mark.parametrize("bad", [2.5, 100.0, "10", 0, -3, True])
def test_non_integer_T_is_refused(bad):
    for maker in (linear_schedule, cosine_schedule):
        with pytest.raises(ValueError, match="T must be a positive integer"):
            maker(bad)
    with pytest.raises(ValueError, match="T must be a positive integer"):
        make_schedule("cosine", bad)


def test_float64_tensor_taken_without_a_float32_round_trip():
    a = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))
    np.testing.assert_array_equal(as_schedule(a).alphas_cumprod, a.numpy())
    np.testing.assert_array_equal(as_schedule(a.numpy()).alphas_cumprod, a.numpy())


def test_schedule_and_its_name_pass_through():
    s = cosine_schedule(100)
    assert as_schedule(s) is s
    back = Schedule.from_dict(s.to_dict())
    assert back.name == s.name == "cosine(T=100)"
    np.testing.assert_array_equal(back.alphas_cumprod, s.alphas_cumprod)
    assert Schedule.from_dict({"alphas_cumprod": [0.9, 0.1]}).name == "custom"


def test_an_array_keeping_most_of_the_signal_is_warned_of():
    """alpha_bar_T-1 = 0.7 > 1/2: the noisiest step still keeps most of the signal (SNR > 1)."""
    with pytest.warns(UserWarning, match=r"ends at 0.7"):
        as_schedule(np.linspace(0.999, 0.7, 100))


def test_the_warning_names_the_callers_line_through_gaussian_diffusion():
    """Built by GaussianDiffusion (inside antdiff), the warning still points at the user's line."""
    from antdiff.diffusion import GaussianDiffusion

    with pytest.warns(UserWarning, match="ends at") as said:
        GaussianDiffusion(1.0 - np.linspace(1e-4, 0.02, 1000))
    assert said[0].filename == __file__
