"""Gaps found by a mutation pass over the timestep sampler, the telemetry, the method registry,
the step stream, the C++ routing (mtl.native) and GradDrop: each test fails on a wrong change
that the other tests did not notice."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from test_native import _gram, _uw_inputs, no_interpreter  # noqa: F401

from ant_kernels.reference import graddrop_ref, nash_weights_ref, uniform_ref
from antdiff.clustering import Clusters
from antdiff.engine.telemetry import FOLD, TAIL, Telemetry
from antdiff.engine.timesteps import TimestepSampler, _Allocations, _systematic
from antdiff.mtl import make_method, native
from antdiff.mtl.graddrop import GradDrop
from antdiff.mtl.stream import StepStream, saved_steps

K = 4


# ---------------------------------------------------------------- timesteps


def test_the_table_at_an_exact_break_gives_the_piece_that_starts_there():
    """Pieces are [a, b): at a start exactly on a break (representable: the denominator is a
    power of two) the table gives the counts of the piece that starts there, as the allocation
    itself does."""
    for B, sizes, mode in [(6, [1, 1, 1, 1, 4], "proportional"), (2, [1, 2, 3, 4], "equal")]:  # noqa: N806
        sizes = np.array(sizes)
        table = _Allocations(B, sizes, mode)
        assert table.breaks, "the case needs breaks"
        for b in table.breaks:
            assert table.draw(b).tolist() == _systematic(B, sizes, mode, b), (B, mode, b)
    assert _Allocations(2, np.array([1, 2, 3, 4]), "equal").draw(0.5).tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("mode", ["proportional", "equal"])
def test_extra_is_the_number_of_samples_left_after_the_floors(mode):
    """``_Allocations.extra``: B minus the sum of floor(quota), in exact fractions."""
    r = np.random.default_rng(11)
    for _ in range(50):
        k = int(r.integers(1, 7))
        sizes = r.integers(1, 30, k)
        B = int(r.integers(1, 40))  # noqa: N806
        T_ = int(sizes.sum())  # noqa: N806
        quota = [Fraction(B, k)] * k if mode == "equal" else [Fraction(B * int(s), T_)
                                                               for s in sizes]  # fmt: skip
        assert _Allocations(B, sizes, mode).extra == B - sum(math.floor(q) for q in quota)


def test_inverse_counts_are_one_over_the_count_and_one_for_an_empty_cluster():
    """1 / max(counts, 1) and presence, float32 [k], and presence as bool."""
    s = TimestepSampler(Clusters((0, 10, 40, 50, 100)), seed=0)
    inv, present, mask = s.inverse_counts(np.array([0, 2, 4, 1]), torch.device("cpu"))
    assert inv.dtype == torch.float32 and present.dtype == torch.float32
    assert inv.tolist() == [1.0, 0.5, 0.25, 1.0]
    assert present.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert mask.dtype == torch.bool and mask.tolist() == [False, True, True, True]


def test_tensors_built_in_inference_mode_are_not_cached_for_training():
    """A count vector first met under torch.inference_mode (an evaluation between steps) must
    not leave inference tensors in the cache: a training step that multiplies them into an
    autograd graph could not save them for backward."""
    s = TimestepSampler(Clusters((0, 10, 40, 50, 100)), seed=0)
    counts = np.array([1, 3, 1, 5])
    with torch.inference_mode():
        s.inverse_counts(counts, torch.device("cpu"))
    inv, _, _ = s.inverse_counts(counts, torch.device("cpu"))
    assert not inv.is_inference()
    w = torch.ones(4, requires_grad=True)
    (w * inv).sin().sum().backward()  # sin saves its input (w * inv) for backward
    torch.testing.assert_close(w.grad, torch.cos(inv) * inv)


def test_uniform_count_vectors_are_not_cached():
    """The "uniform" counts take too many vectors to cache (the cache is for the handful of
    systematic ones)."""
    s = TimestepSampler(Clusters((0, 10, 40, 50, 100)), mode="uniform", seed=0)
    for _ in range(5):
        _, counts = s.sample(8)
        s.inverse_counts(counts, torch.device("cpu"))
    assert s._placements == {}


def test_a_state_dict_taken_mid_batch_is_a_copy():
    """The saved rng state mid-batch is the caller's: writing it changes neither the sampler's
    next state_dict nor its draws."""
    clusters = Clusters((0, 10, 40, 50, 100))
    a, b = TimestepSampler(clusters, seed=5), TimestepSampler(clusters, seed=5)
    for s in (a, b):
        for _ in range(3):
            s.sample(7)
    state = a.state_dict()
    assert state["used"] == 3
    want = b.state_dict()
    state["rng"]["state"]["state"] = 12345
    assert a.state_dict() == want
    c = TimestepSampler(clusters, seed=0)
    c.load_state_dict(a.state_dict())
    assert [c.sample(7)[1].tolist() for _ in range(70)] == [
        b.sample(7)[1].tolist() for _ in range(70)
    ]


# ---------------------------------------------------------------- telemetry


def _ones(n: int = K) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool)


def test_a_verdict_after_more_than_tail_unclosed_steps_takes_out_the_last_ones():
    """A trainer that never closes a step keeps only the last TAIL folded micro-batches: a
    verdict on the last n reaches those, not the first ones recorded."""
    n_steps = TAIL + 2 * FOLD
    tel = Telemetry(K)
    losses = [torch.full((K,), float(i)) for i in range(n_steps)]
    for L in losses:  # noqa: N806
        tel.update(L, torch.ones(K), _ones(), torch.tensor(True))
    tel.snapshot()  # all folded
    tel.count_nonfinite(torch.tensor(False), n=3)
    snap = tel.snapshot()
    assert snap["nonfinite_steps"] == 3
    kept = np.arange(n_steps - 3, dtype=np.float64)  # the last three left the means
    np.testing.assert_allclose(snap["loss_mean"], [kept.mean()] * K, rtol=1e-6)


def test_a_fold_with_one_step_without_a_gram_counts_each_gram_once():
    """A fold where exactly one kept step has no Gram (a loss-space step): the pairs are those
    of the Gram steps alone, each counted once, with their own presence."""
    G = torch.tensor([[1.0, -0.5, 0.0], [-0.5, 1.0, 0.2], [0.0, 0.2, 1.0]])  # noqa: N806
    tel = Telemetry(3)
    ok = torch.tensor(True)
    tel.update(torch.ones(3), torch.ones(3), torch.tensor([True, True, False]), ok, G)
    tel.update(torch.ones(3), torch.ones(3), _ones(3), ok, None)
    s = tel.snapshot()
    rate = np.array(s["conflict_rate"])
    assert rate[0, 1] == 1.0 and rate[1, 0] == 1.0 and rate[0, 0] == 0.0
    assert np.isnan(rate[2]).all() and np.isnan(rate[:, 2]).all()  # absent at the Gram step
    np.testing.assert_allclose(np.array(s["cosine_mean"])[:2, :2], [[1, -0.5], [-0.5, 1]])
    assert tel.t["pair_count"].tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]


def test_cosines_of_a_gram_with_a_zero_row_are_zero_there():
    """``_cosine``: G_ij / sqrt(G_ii G_jj), with 0 (not NaN) in the row and column of a zero
    gradient."""
    J = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-3.0, 1.0]], dtype=torch.float64)  # noqa: N806
    cos = Telemetry._cosine(J @ J.T)
    n = J.norm(dim=1)
    want = torch.where(n[:, None] * n[None, :] > 0, (J @ J.T) / (n[:, None] * n[None, :]), 0.0)
    assert cos.dtype == torch.float32 and torch.isfinite(cos).all()
    torch.testing.assert_close(cos, want.float())
    assert cos[1].tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- step stream

_GOLDEN = 0x9E3779B97F4A7C15


def _ref(seed: int, step: int, n: int) -> torch.Tensor:
    return uniform_ref(seed, torch.tensor([step], dtype=torch.int64), n)


def test_the_stream_key_is_seed_plus_tag_times_golden_mod_2_64():
    """The documented Philox key, and the uniforms drawn with it (the reference)."""
    for seed, tag in [(0, 0), (3, 1), ((1 << 64) - 1, 1), (12345, 2), ((1 << 63) + 7, 3)]:
        st = StepStream(seed, tag=tag)
        key = (seed + tag * _GOLDEN) % (1 << 64)
        assert st.key == key
        assert torch.equal(st.uniform(9, torch.device("cpu")), _ref(key, 0, 9))


def test_the_stream_counts_valid_steps_only_and_restores_from_its_state():
    """advance(valid) adds the flag; a loaded state (seed, steps) draws the uniforms of that
    step under the loaded seed, also into a stream that had its own counter already."""
    st = StepStream(7, tag=1)
    cpu = torch.device("cpu")
    st.uniform(3, cpu)
    for v in (True, False, True, True, False):
        st.advance(torch.tensor(v))
    st.advance()
    state = st.state_dict()
    assert state == {"seed": 7, "steps": torch.tensor(4)}
    other = StepStream(99, tag=1)
    other.uniform(3, cpu)
    other.advance()
    other.load_state_dict(state)
    key = (7 + _GOLDEN) % (1 << 64)
    assert torch.equal(other.uniform(5, cpu), _ref(key, 4, 5))
    fresh = StepStream(0, tag=1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.uniform(5, cpu), _ref(key, 4, 5))
    fresh.load_state_dict({"seed": 7})  # no "steps": step 0
    assert torch.equal(fresh.uniform(5, cpu), _ref(key, 0, 5))


def test_a_saved_stream_state_is_a_copy():
    st = StepStream(1)
    st.uniform(1, torch.device("cpu"))
    st.advance()
    state = st.state_dict()
    state["steps"].fill_(50)
    assert int(st.state_dict()["steps"]) == 1


@pytest.mark.parametrize(
    "steps",
    [torch.tensor(2.0), torch.tensor(True), torch.tensor(-1), torch.tensor([1, 2]), 3,
     torch.zeros(0, dtype=torch.int64)],
)  # fmt: skip
def test_saved_steps_refuses_what_is_not_a_one_element_integer_tensor_ge_0(steps):
    with pytest.raises(ValueError, match="'steps' must be a one-element integer tensor >= 0"):
        saved_steps({"steps": steps}, "random stream")
    assert saved_steps({"steps": torch.tensor([5])}, "x") == 5
    assert saved_steps({}, "x") == 0


@pytest.mark.parametrize("seed", [-1, 1 << 64, True, 2.0])
def test_a_stream_refuses_a_seed_outside_64_bits_also_from_a_state(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        StepStream(seed)
    st = StepStream(5)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        st.load_state_dict({"seed": seed, "steps": torch.tensor(0)})
    assert StepStream((1 << 64) - 1).seed == (1 << 64) - 1


def test_a_generator_based_stream_state_warns_and_restarts():
    st = StepStream(5, tag=2)
    with pytest.warns(UserWarning, match="generator-based checkpoint: the stream restarts"):
        st.load_state_dict({"seed": 8, "state": torch.zeros(3, dtype=torch.uint8)})
    key = (8 + 2 * _GOLDEN) % (1 << 64)
    assert torch.equal(st.uniform(4, torch.device("cpu")), _ref(key, 0, 4))


# ---------------------------------------------------------------- mtl.native


def test_the_cpp_solvers_stand_aside_where_triton_serves_the_cpu(monkeypatch):
    """Under the interpreter (TRITON_INTERPRET=1) Triton serves CPU tensors: the C++ serves
    nothing there, whatever the op."""
    assert native._C is not None, "antdiff._C is not built: run `make build`"
    monkeypatch.setenv("ANT_KERNELS_BACKEND", "auto")
    G = _gram(4, 0)  # noqa: N806
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not native.serves("pcgrad", G) and not native.serves("nash", G)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert native.serves("pcgrad", G) and native.serves("nash", G)


@pytest.mark.usefixtures("no_interpreter")
def test_nash_weights_in_cpp_take_iters_and_normalize():
    G = _gram(5, 3) * 7.0  # noqa: N806
    for iters, normalize in ((0, True), (40, True), (40, False)):  # iters=0: NaN (no solution)
        torch.testing.assert_close(
            native.nash_weights(G, iters=iters, normalize=normalize),
            nash_weights_ref(G, iters=iters, normalize=normalize), rtol=1e-9, atol=1e-12,
            equal_nan=True,
        )  # fmt: skip
    a, b = native.nash_weights(G), native.nash_weights(G, normalize=False)
    torch.testing.assert_close(b, a / torch.linalg.matrix_norm(G).sqrt(), rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="iters must be an integer >= 0"):
        native.nash_weights(G, iters=-1)


@pytest.mark.usefixtures("no_interpreter")
def test_pcgrad_weights_in_cpp_check_the_orders():
    G = _gram(3, 1)  # noqa: N806
    for bad in (torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 3)):
        with pytest.raises(ValueError, match="orders"):
            native.pcgrad_weights(G, bad)


@pytest.mark.usefixtures("no_interpreter")
def test_uniform_in_cpp_takes_the_offset_and_a_negative_view_step():
    step = torch.tensor([6], dtype=torch.int64)
    for offset in (0, 1, 5, 9):
        want = uniform_ref(77, step, 10, offset=offset)
        assert torch.equal(native.uniform(77, step, 10, offset=offset), want)
    neg = torch._neg_view(torch.tensor([-6], dtype=torch.int64))
    assert torch.equal(native.uniform(77, neg, 10), uniform_ref(77, step, 10))


def _graddrop_inputs(k: int = 4, P: int = 50):  # noqa: N803
    g = torch.Generator().manual_seed(k * 100 + P)
    J = torch.randn(k, P, generator=g)  # noqa: N806
    present = torch.tensor([True, False, True, True][:k])
    return J, present, torch.tensor([3], dtype=torch.int64)


@pytest.mark.usefixtures("no_interpreter")
def test_graddrop_in_cpp_checks_its_arguments_and_reads_a_negative_view_divisor():
    J, present, step = _graddrop_inputs()  # noqa: N806
    div = torch.tensor(3.0)
    want = graddrop_ref(J, present, 11, step, 0.25, div)
    assert torch.equal(native.graddrop(J, present, 11, step, 0.25, div), want)
    neg = torch._neg_view(torch.tensor(-3.0))
    assert torch.equal(native.graddrop(J, present, 11, step, 0.25, neg), want)
    negJ = torch._neg_view(-J)  # noqa: N806  (memory holds -J; the values are J)
    assert torch.equal(native.graddrop(negJ, present, 11, step, 0.25, div), want)
    row = J[0].clone().expand(4, 50)  # rows not apart: the same row four times
    assert torch.equal(native.graddrop(row, present, 11, step, 0.25, div),
                       graddrop_ref(row.contiguous(), present, 11, step, 0.25, div))  # fmt: skip
    out = torch.empty(50, dtype=torch.float64)  # not the C++'s: the reference writes it
    native.graddrop(J, present, 11, step, 0.25, div, out)
    torch.testing.assert_close(out, graddrop_ref(J, present, 11, step, 0.25, div, out.clone()))
    with pytest.raises(ValueError, match="leak must be a number in"):
        native.graddrop(J, present, 11, step, 1.5, div)
    with pytest.raises(ValueError, match="seed must be an int"):
        native.graddrop(J, present, -1, step, 0.25, div)
    with pytest.raises(ValueError, match="present must be a bool"):
        native.graddrop(J, present.float(), 11, step, 0.25, div)


@pytest.mark.usefixtures("no_interpreter")
def test_uw_in_cpp_checks_the_shapes():
    per, s, cid, inv, present = _uw_inputs(4, 16, 0)
    with pytest.raises(ValueError, match="uw_forward needs per, cid"):
        native.uw_forward(per, s, cid, inv, present[:3].contiguous())
    with pytest.raises(ValueError, match="uw_forward: per must be a contiguous CPU"):
        native.uw_forward(per.double(), s, cid, inv, present)
    coef = native.uw_forward(per, s, cid, inv, present)[3]
    with pytest.raises(ValueError, match="uw_backward needs g 0-d"):
        native.uw_backward(torch.ones(1), coef, cid)


# ---------------------------------------------------------------- GradDrop


def test_graddrop_draws_from_its_own_tagged_stream_of_valid_steps():
    """U comes from the stream keyed (seed + 1 * golden) mod 2**64 (default seed 3) at the count
    of valid steps: a skipped step draws nothing; "mean" divides by the present clusters."""
    J, present, _ = _graddrop_inputs()  # noqa: N806
    for seed in (None, 0, (1 << 64) - 1):
        gd = GradDrop(4, leak=0.1) if seed is None else GradDrop(4, leak=0.1, seed=seed)
        key = ((3 if seed is None else seed) + _GOLDEN) % (1 << 64)
        for step, valid in ((0, False), (0, True), (1, None), (2, True)):
            got = gd.combine_grads(J, present, None if valid is None else torch.tensor(valid))
            div = torch.tensor(3.0)
            want = graddrop_ref(J, present, key, torch.tensor([step]), 0.1, div)
            assert torch.equal(got, want), (seed, step)


def test_graddrop_names_a_J_of_another_k_or_dtype():
    gd = GradDrop(3)
    present = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"J must be a tensor of shape \[k, P\] with k=3"):
        gd.combine_grads(torch.randn(4, 5), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="J must be a float tensor, got torch.int64"):
        gd.combine_grads(torch.ones(3, 5, dtype=torch.int64), present)


def test_graddrop_state_checks_k_and_last_weights_and_reads_an_old_rng_key():
    gd = GradDrop(3, seed=9)
    J = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))  # noqa: N806
    present = torch.ones(3, dtype=torch.bool)
    gd.combine_grads(J, present)
    state = gd.state_dict()
    with pytest.raises(ValueError, match="saved with k=3 clusters, but this method has k=4"):
        GradDrop(4).load_state_dict(state)
    with pytest.raises(ValueError, match="needs 'last_weights'"):
        GradDrop(3).load_state_dict({k: v for k, v in state.items() if k != "last_weights"})
    old = {k: v for k, v in state.items() if k not in ("stream", "k")}
    old["rng"] = state["stream"]  # the key of states written before "stream"
    b = GradDrop(3)
    b.load_state_dict(old)
    assert torch.equal(b.combine_grads(J, present), gd.combine_grads(J, present))


# ---------------------------------------------------------------- registry


def test_make_method_refuses_a_name_that_is_not_a_str_and_a_bad_k_even_for_vanilla():
    with pytest.raises(TypeError, match="name must be a str, got list"):
        make_method(["uw"], 3)
    for k in (0, -1, 2.0):
        with pytest.raises(ValueError, match="k must be"):
            make_method("vanilla", k)
    with pytest.raises(ValueError, match=r"vanilla takes no hyperparameters, got \['lr'\]"):
        make_method("vanilla", 3, lr=0.1)


def test_reductions_a_gradient_method_gets_alone_and_composed():
    """Alone: "mean"; after a loss method: "sum", except Nash-MTL ("mean"); a reduction the
    user names wins."""
    assert make_method("pcgrad", 3).grad.reduction == "mean"
    assert make_method("uw+pcgrad", 3).grad.reduction == "sum"
    assert make_method("uw+nash", 3).grad.reduction == "mean"
    assert make_method("uw+pcgrad", 3, reduction="mean").grad.reduction == "mean"
    assert make_method("rlw+imtl", 3, reduction="mean").grad.reduction == "mean"


def test_a_loss_method_alone_updates_every_step_and_moves_with_to():
    m = make_method("uw", 3)
    assert m.update_every == 1 and m.needs == "none" and not m.is_vanilla
    assert m.to("meta") is m and m.loss.s.device.type == "meta"


def test_combine_grads_is_refused_by_a_gram_method_with_a_message():
    m = make_method("uw+pcgrad", 3)
    with pytest.raises(ValueError, match="uw\\+pcgrad does not combine gradients elementwise"):
        m.combine_grads(torch.randn(3, 4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="uw has no gradient method"):
        make_method("uw", 3).weights(torch.eye(3), torch.ones(3, dtype=torch.bool))


def test_terms_without_a_loss_method_check_the_losses():
    m = make_method("pcgrad", 3)
    present = torch.tensor([True, False, True])
    assert m.terms(torch.tensor([1.0, 2.0, 3.0]), present).tolist() == [1.0, 0.0, 3.0]
    with pytest.raises(ValueError, match=r"L must be a float tensor of shape \[k\]=\[3\]"):
        m.terms(torch.ones(4), torch.ones(4, dtype=torch.bool))


def test_a_composite_weights_step_that_is_not_valid_keeps_the_saved_weights():
    m = make_method("pcgrad", 3)
    present = torch.ones(3, dtype=torch.bool)
    J = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))  # noqa: N806
    m.weights(J @ J.T, present)
    saved = m.grad.state_dict()["last_weights"].clone()
    J2 = torch.tensor([[1.0, 0, 0, 0, 0, 0], [-1.0, 1, 0, 0, 0, 0], [0.0, 0, 1, 0, 0, 0]])  # noqa: N806
    m.weights(J2 @ J2.T, present, torch.tensor(False))
    assert torch.equal(m.grad.state_dict()["last_weights"], saved)
    m.weights(J2 @ J2.T, present, torch.tensor(True))
    assert not torch.equal(m.grad.state_dict()["last_weights"], saved)


def test_a_composite_state_loads_both_parts():
    a, b = make_method("uw+pcgrad", 3), make_method("uw+pcgrad", 3)
    J = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))  # noqa: N806
    a.weights(J @ J.T, torch.ones(3, dtype=torch.bool))
    with torch.no_grad():
        a.loss.s.copy_(torch.tensor([0.5, -1.0, 2.0]))
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.loss.s, a.loss.s)
    assert torch.equal(b.grad.last_weights, a.grad.last_weights)
    with pytest.raises(ValueError, match="state is for method 'uw\\+pcgrad', this is 'uw'"):
        make_method("uw", 3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="uw state does not fit: this method has k=4"):
        make_method("uw", 4).load_state_dict(make_method("uw", 3).state_dict())


def test_a_verdict_on_folded_steps_takes_out_each_finite_one_once():
    """A non-finite verdict on micro-batches already folded: one that was non-finite on its own
    is neither counted again nor taken out of the means again; n beyond the folded ones
    reaches all of them."""
    tel = Telemetry(K)
    flags = (True, True, False, True)
    for i, ok in enumerate(flags):
        tel.update(torch.full((K,), float(i + 1)), torch.ones(K), _ones(), torch.tensor(ok))
    tel.snapshot()  # all four folded; the optimiser step started at the second
    tel.count_nonfinite(torch.tensor(False), n=3)
    tel.count_nonfinite(torch.tensor(False), n=3)  # the same verdict again changes nothing
    snap = tel.snapshot()
    assert snap["nonfinite_steps"] == 3 and tel.nonfinite() == 3
    np.testing.assert_allclose(snap["loss_mean"], [1.0] * K)
    tel = Telemetry(K)
    for i in range(2):
        tel.update(torch.full((K,), float(i + 1)), torch.ones(K), _ones(), torch.tensor(True))
    tel.snapshot()
    tel.count_nonfinite(torch.tensor(False), n=3)  # more than were recorded: all of them
    snap = tel.snapshot()
    assert snap["nonfinite_steps"] == 2 and np.isnan(snap["loss_mean"]).all()


def test_unsolved_flags_not_yet_folded_survive_a_save_and_load():
    tel = Telemetry(K)
    for i in range(5):
        tel.update(torch.ones(K), torch.ones(K), _ones(), torch.tensor(True))
        tel.count_unsolved(torch.tensor(i % 2 == 0))
    resumed = Telemetry(K)
    resumed.load_state_dict(tel.state_dict())
    assert resumed.unsolved(fold=False) == 3
    assert resumed.snapshot()["unsolved_weight_steps"] == 3


def test_a_composite_passes_observed_losses_to_its_loss_method():
    m = make_method("dwa+pcgrad", 3)
    m.observe(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, True, False]))
    state = m.loss.state_dict()
    assert state["last"].tolist()[:2] == [1.0, 2.0] and int(state["seen"]) == 1
    make_method("pcgrad", 3).observe(torch.ones(3), torch.ones(3, dtype=torch.bool))  # no-op
