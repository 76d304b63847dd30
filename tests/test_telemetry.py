"""Engine telemetry: the running sums it folds every FOLD steps equal a per-step float64
accumulation, across folds, snapshots, checkpoints and a flag changed by ant.step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from antdiff.engine.telemetry import FOLD, Telemetry

K = 4


def _steps(n: int, seed: int = 0):
    """n random steps: L [k], present [k] bool, finite 0-d bool, G [k, k] PSD or None."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = torch.rand(K, generator=gen) * 3  # noqa: N806
        present = torch.rand(K, generator=gen) > 0.2
        finite = torch.tensor(bool(i % 7 != 3))
        if not bool(finite):
            L[int(torch.randint(K, (1,), generator=gen))] = float("nan")
        J = torch.randn(K, 6, generator=gen, dtype=torch.float64)  # noqa: N806
        G = (J @ J.T).float() if i % 3 != 1 else None  # noqa: N806
        out.append((L, present, finite, G))
    return out


def _expected(steps):
    """Running means, conflict rates and counts accumulated step by step in float64."""
    loss_sum, loss_n = np.zeros(K), np.zeros(K)
    cos_sum, conflicts, pairs = np.zeros((K, K)), np.zeros((K, K)), np.zeros((K, K))
    bad, last_cos = 0, None
    for L, present, finite, G in steps:  # noqa: N806
        p, ok = present.numpy(), bool(finite)
        bad += not ok
        if ok:
            loss_sum[p] += L.double().numpy()[p]
            loss_n[p] += 1
        if G is None:
            continue
        g = G.double().numpy()
        d = np.sqrt(np.maximum(np.diag(g), 1e-30))
        cos = g / np.outer(d, d)
        p = p & (np.diag(g) > 0)  # a zero gradient has no direction: no cosine
        last_cos = np.where(np.outer(p, p) & ok, cos, np.nan)  # a skipped step: all NaN
        both = np.outer(p, p) & ok
        cos_sum[both] += cos[both]
        conflicts[both & (cos < 0)] += 1
        pairs[both] += 1
    n = np.maximum(pairs, 1)
    unseen = pairs == 0  # never measured together: unknown, not 0
    return {
        "loss_mean": np.where(loss_n > 0, loss_sum / np.maximum(loss_n, 1), np.nan),
        "nonfinite_steps": bad,
        "conflict_rate": np.where(unseen, np.nan, conflicts / n),
        "cosine_mean": np.where(unseen, np.nan, cos_sum / n), "cosine": last_cos,
        "loss": np.where(steps[-1][1].numpy(), steps[-1][0].numpy(), np.nan),
    }  # fmt: skip


def _check(snap, steps):
    exp = _expected(steps)
    assert snap["steps"] == len(steps)
    assert snap["nonfinite_steps"] == exp["nonfinite_steps"]
    for name in ("loss_mean", "conflict_rate", "cosine_mean", "cosine"):
        np.testing.assert_allclose(snap[name], exp[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(np.array(snap["loss"]), exp["loss"])


@pytest.mark.parametrize("n", [1, FOLD - 1, FOLD, FOLD + 1, 2 * FOLD + 5])
def test_folded_running_sums_equal_per_step_accumulation(n):
    steps = _steps(n)
    tel = Telemetry(K)
    for L, present, finite, G in steps:  # noqa: N806
        tel.update(L, torch.ones(K), present, finite, G)
    _check(tel.snapshot(), steps)


def test_snapshots_and_checkpoints_mid_fold_change_nothing():
    steps = _steps(2 * FOLD + 9, seed=1)
    tel = Telemetry(K)
    for i, (L, present, finite, G) in enumerate(steps):  # noqa: N806
        tel.update(L, torch.ones(K), present, finite, G)
        if i in (5, FOLD + 2):
            _check(tel.snapshot(), steps[: i + 1])
        if i == FOLD + 11:  # resume from a checkpoint written mid-fold
            state = tel.state_dict()
            tel = Telemetry(K)
            tel.load_state_dict(state)
    _check(tel.snapshot(), steps)


@pytest.mark.parametrize("folded_first", [False, True])
def test_a_step_found_nonfinite_later_is_not_counted_as_finite(folded_first):
    """ant.step can turn the last step's flag to False after update (its gradients); the
    running sums must then treat the step as skipped, whether or not it was folded already."""
    steps = _steps(FOLD + 3, seed=2)
    tel = Telemetry(K)
    for L, present, finite, G in steps:  # noqa: N806
        tel.update(L, torch.ones(K), present, finite, G)
    assert bool(steps[-1][2])
    if folded_first:  # a stats() call between the step's reduce and ant.step
        tel.snapshot()
    tel.count_nonfinite(torch.tensor(False))
    snap = tel.snapshot()
    assert snap["nonfinite_steps"] == _expected(steps)["nonfinite_steps"] + 1
    L, present, _, G = steps[-1]  # noqa: N806
    assert G is None  # a loss-space step, the only kind ant.step re-flags
    # either way the step's losses left the running means
    _check(snap, [*steps[:-1], (L, present, torch.tensor(False), G)])


def test_update_queues_no_operators_between_folds():
    """The per-step cost: no torch operator in update between folds (they batch at the fold)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    steps, w = _steps(FOLD), torch.ones(K)
    unsolved = [torch.tensor(i % 5 == 2) for i in range(FOLD)]  # a weight solve's verdict
    tel = Telemetry(K)
    with Count():
        for (L, present, finite, G), flag in zip(steps, unsolved):  # noqa: N806
            tel.update(L, w, present, finite, G)
            tel.count_unsolved(flag)
    assert Count.n == 0
    assert tel.snapshot()["unsolved_weight_steps"] == sum(bool(f) for f in unsolved)
    tel = Telemetry(K)
    for L, present, finite, G in steps:  # noqa: N806
        tel.update(L, w, present, finite, G)
    with Count():
        tel.update(steps[0][0], w, *steps[0][1:])
    assert Count.n > 0  # the fold


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_updates_and_folds_have_no_host_sync_on_cuda():
    """Every update, including the folds (steps with and without a Gram matrix), stays on the
    device."""
    steps = [[x.cuda() if x is not None else None for x in s] for s in _steps(2 * FOLD + 3)]
    w = torch.ones(K, device="cuda")
    tel = Telemetry(K)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for L, present, finite, G in steps:  # noqa: N806
            tel.update(L, w, present, finite, G)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check(tel.snapshot(), [[x.cpu() if x is not None else None for x in s] for s in steps])


def test_pairs_never_measured_together_are_nan_not_zero():
    """A cluster absent at every Gram step has no conflict rate or mean cosine with anyone (a
    0 would read as "measured, never conflicts"); the others keep theirs."""
    steps = [(L, present & torch.tensor([True, True, False, True]), finite, G)
             for L, present, finite, G in _steps(40, seed=3)]  # fmt: skip
    tel = Telemetry(K)
    for L, present, finite, G in steps:  # noqa: N806
        tel.update(L, torch.ones(K), present, finite, G)
    snap = tel.snapshot()
    _check(snap, steps)
    rate = np.array(snap["conflict_rate"])
    assert np.isnan(rate[2]).all() and np.isnan(rate[:, 2]).all()
    assert np.isfinite(np.delete(np.delete(rate, 2, 0), 2, 1)).all()


def test_a_cluster_never_measured_has_no_loss_mean():
    """Its mean was reported as 0.0 (as if measured at zero loss); pairs already said NaN."""
    steps = [(L, present & torch.tensor([True, True, False, True]), finite, G)
             for L, present, finite, G in _steps(10, seed=4)]  # fmt: skip
    tel = Telemetry(K)
    for L, present, finite, G in steps:  # noqa: N806
        tel.update(L, torch.ones(K), present, finite, G)
    mean = np.array(tel.snapshot()["loss_mean"])
    assert np.isnan(mean[2]) and np.isfinite(np.delete(mean, 2)).all()


def test_absent_and_zero_gradient_clusters_have_no_last_loss_or_cosine():
    """The last step's loss of an absent cluster was logged as 0 (metrics.csv, TensorBoard)
    while its running mean said NaN; a present cluster with a zero gradient counted as
    cosine 0 with everyone (means pulled to 0, the diagonal below 1)."""
    J = torch.randn(K, 6, dtype=torch.float64)  # noqa: N806
    J[1] = 0.0  # present, zero gradient
    G = (J @ J.T).float()  # noqa: N806
    present = torch.tensor([True, True, True, False])
    tel = Telemetry(K)
    for _ in range(3):
        tel.update(torch.rand(K) + 1, torch.ones(K), present, torch.tensor(True), G)
    snap = tel.snapshot()
    assert np.isnan(snap["loss"][3]) and np.isfinite(snap["loss"][:3]).all()
    assert snap["weight"][3] == 1.0  # weights are reported as given
    cos, mean = np.array(snap["cosine"]), np.array(snap["cosine_mean"])
    for m in (cos, mean):
        assert np.isnan(m[1]).all() and np.isnan(m[:, 1]).all() and np.isnan(m[3]).all()
        np.testing.assert_allclose(np.diag(m)[[0, 2]], 1.0, rtol=1e-6)


def test_the_last_cosine_of_a_skipped_step_is_nan():
    """stats()["cosine"] showed the matrix of a step skipped as non-finite (its running mean
    left it out)."""
    J = torch.randn(K, 6, dtype=torch.float64)  # noqa: N806
    G = (J @ J.T).float()  # noqa: N806
    tel = Telemetry(K)
    ones = torch.ones(K, dtype=torch.bool)
    tel.update(torch.rand(K), torch.ones(K), ones, torch.tensor(True), G)
    J[1] = -J[0]  # a conflicting pair in the skipped step
    tel.update(torch.rand(K), torch.ones(K), ones, torch.tensor(False), (J @ J.T).float())
    snap = tel.snapshot()
    assert np.isnan(np.array(snap["cosine"])).all()
    assert np.isfinite(np.array(snap["cosine_mean"])).all()  # the finite step's


@pytest.mark.parametrize("at", [5, FOLD - 1, FOLD + 3])
def test_a_save_and_load_between_folds_keeps_the_running_sums_bit_exact(at):
    """state_dict folded the pending steps: a resumed run summed them in other groups than an
    unbroken run, and its logged means differed by an ulp. The unfolded steps are saved."""
    steps = _steps(3 * FOLD, seed=3)
    w = torch.full((K,), 0.25)
    ref, snaps = Telemetry(K), []
    for i, s in enumerate(steps):
        ref.update(s[0], w, s[1], s[2], s[3])
        if i + 1 in (2 * FOLD - 7, 3 * FOLD):
            snaps.append(ref.snapshot())
    first = Telemetry(K)
    for s in steps[:at]:
        first.update(s[0], w, s[1], s[2], s[3])
    resumed, got = Telemetry(K), []
    resumed.load_state_dict(first.state_dict())
    for i, s in enumerate(steps[at:], start=at):
        resumed.update(s[0], w, s[1], s[2], s[3])
        if i + 1 in (2 * FOLD - 7, 3 * FOLD):
            got.append(resumed.snapshot())
    assert got == snaps  # exact


def test_orthogonal_clusters_are_not_a_conflict():
    """A conflict is a negative cosine (g_i . g_j < 0): exactly orthogonal gradients (disjoint
    parameters) are not one."""
    tel = Telemetry(2)
    G = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # noqa: N806
    for _ in range(3):
        tel.update(torch.ones(2), torch.full((2,), 0.5), torch.ones(2, dtype=torch.bool),
                   torch.tensor(True), G)  # fmt: skip
    s = tel.snapshot()
    assert s["conflict_rate"] == [[0.0, 0.0], [0.0, 0.0]] and s["cosine_mean"][0][1] == 0.0


def _fresh(n: int, seed: int):
    """n finite steps with every cluster present and no Gram (loss-space micro-batches)."""
    gen = torch.Generator().manual_seed(seed)
    ones = torch.ones(K, dtype=torch.bool)
    return [(torch.rand(K, generator=gen) + 1, ones, torch.tensor(True), None) for _ in range(n)]


def _check_losses(snap, steps):
    """``_check`` for steps without a Gram: counts and loss means only."""
    exp = _expected(steps)
    assert snap["steps"] == len(steps)
    assert snap["nonfinite_steps"] == exp["nonfinite_steps"]
    np.testing.assert_allclose(snap["loss_mean"], exp["loss_mean"], rtol=1e-6)


def _flagged(steps, bad):
    """``steps`` with the steps at indices ``bad`` marked non-finite (for ``_check_losses``)."""
    return [(L, p, torch.tensor(False) if i in bad else f, G)
            for i, (L, p, f, G) in enumerate(steps)]  # fmt: skip


@pytest.mark.parametrize("fold_at", [(), (1,), (1, 2)])
def test_a_nonfinite_verdict_reaches_every_micro_batch_of_the_step(fold_at):
    """count_nonfinite(after, n) flags all n micro-batches of the optimiser step, the earlier
    ones too, whether they are still kept, folded by one stats() call or by several between
    them (the steps before them stay finite)."""
    steps = _fresh(8, seed=5)
    tel = Telemetry(K)
    for i, (L, present, finite, G) in enumerate(steps):  # noqa: N806
        tel.update(L, torch.ones(K), present, finite, G)
        if i - 5 in fold_at:  # micro-batches 5, 6, 7 form the last optimiser step
            tel.snapshot()
    tel.count_nonfinite(torch.tensor(False), n=3)
    assert tel.nonfinite() == 3
    _check_losses(tel.snapshot(), _flagged(steps, {5, 6, 7}))


def test_a_finite_verdict_keeps_an_earlier_micro_batch_nonfinite():
    """Each micro-batch's flag becomes its own and the verdict: a finite verdict does not make
    a micro-batch that was non-finite on its own count as finite."""
    steps = _fresh(3, seed=6)
    steps[1] = (steps[1][0], steps[1][1], torch.tensor(False), None)
    tel = Telemetry(K)
    for L, present, finite, G in steps:  # noqa: N806
        tel.update(L, torch.ones(K), present, finite, G)
    tel.count_nonfinite(torch.tensor(True), n=3)
    _check_losses(tel.snapshot(), steps)


def test_a_verdict_does_not_reach_past_the_last_optimiser_step():
    """close() ends an optimiser step: the next verdict cannot flag its micro-batches, even
    with an n larger than the micro-batches recorded since (folded or not)."""
    steps = _fresh(4, seed=7)
    tel = Telemetry(K)
    for L, present, finite, G in steps[:3]:  # noqa: N806
        tel.update(L, torch.ones(K), present, finite, G)
    tel.snapshot()
    tel.close()
    tel.update(steps[3][0], torch.ones(K), *steps[3][1:])
    tel.count_nonfinite(torch.tensor(False), n=3)
    _check_losses(tel.snapshot(), _flagged(steps, {3}))


def test_a_verdict_after_a_resume_reaches_micro_batches_folded_before_the_save():
    """The folded micro-batches of an unfinished optimiser step are saved with the state: a
    verdict after the resume still takes them out of the running sums."""
    steps = _fresh(4, seed=8)
    tel = Telemetry(K)
    for L, present, finite, G in steps[:3]:  # noqa: N806
        tel.update(L, torch.ones(K), present, finite, G)
    tel.snapshot()  # micro-batches 1 and 2 of the step (2, 3) are folded
    resumed = Telemetry(K)
    resumed.load_state_dict(tel.state_dict())
    resumed.update(steps[3][0], torch.ones(K), *steps[3][1:])
    resumed.count_nonfinite(torch.tensor(False), n=2)
    _check_losses(resumed.snapshot(), _flagged(steps, {2, 3}))


def test_counts_read_without_folding_include_the_kept_steps():
    """nonfinite() and unsolved(fold=False) count the steps not folded yet as well as the
    folded ones, and reading them folds nothing."""
    steps = _steps(FOLD + 10, seed=9)  # one fold, then 9 kept steps
    flags = [torch.tensor(i % 4 == 1) for i in range(len(steps))]
    tel = Telemetry(K)
    for (L, present, finite, G), flag in zip(steps, flags):  # noqa: N806
        tel.update(L, torch.ones(K), present, finite, G)
        tel.count_unsolved(flag)
    assert len(tel._pending) == 10
    assert tel.nonfinite() == sum(not bool(f) for _, _, f, _ in steps)
    assert tel.unsolved(fold=False) == sum(bool(f) for f in flags)
    assert len(tel._pending) == 10  # nothing folded
    assert tel.unsolved() == sum(bool(f) for f in flags)
