from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch

from antdiff.clustering import Clusters, cluster_timesteps, default_limits, plot_clusters
from antdiff.interval_dp import interval_cost
from antdiff.schedules import Schedule, cosine_schedule, linear_schedule


def test_timestep_objective_is_uniform_split():
    c = cluster_timesteps(linear_schedule(1000), 5, "timestep")
    assert c.bounds == (0, 200, 400, 600, 800, 1000)
    c = cluster_timesteps(linear_schedule(1000), 5, "timestep", min_size=None, max_size=None)
    assert c.bounds == (0, 200, 400, 600, 800, 1000)


@pytest.mark.parametrize("T,k,limits", [(1003, 5, {}), (97, 7, {}), (50, 3, {"min_size": 16}),
                                        (61, 4, {"min_size": None, "max_size": None})])
def test_timestep_objective_is_the_uniform_split_and_optimal(T, k, limits):  # noqa: N803
    """Where T % k leaves several optima the split is Clusters.uniform's (NTG's intervals):
    the DP's tie-break gave (0, 200, 400, 601, 802, 1003) at T = 1003, k = 5."""
    from antdiff.interval_dp import solve_intervals

    c = cluster_timesteps(linear_schedule(T), k, "timestep", **limits)
    assert c.bounds == Clusters.uniform(T, k).bounds
    lo, hi = c.meta["min_size"], c.meta["max_size"]
    _, best = solve_intervals("l2", k, values=np.arange(T, dtype=np.float64), min_size=lo,
                              max_size=hi)  # fmt: skip
    assert c.cost == pytest.approx(best, rel=1e-12)


def test_timestep_objective_refuses_limits_no_split_meets():
    """The uniform split was returned under limits it breaks (min_size 300 for k = 4)."""
    for limits, name in (({"min_size": 300}, "min_size"),
                         ({"min_size": None, "max_size": 100}, "max_size")):
        with pytest.raises(ValueError, match=f"{name}=.* is infeasible for k=4, T=1000"):
            cluster_timesteps(linear_schedule(1000), 4, "timestep", **limits)


def test_snr_golden_linear_schedule():
    c = cluster_timesteps(linear_schedule(1000), 5, "snr", min_size=None, max_size=None)
    assert c.bounds == (0, 153, 394, 624, 823, 1000)
    assert c.cost == pytest.approx(781.7405, abs=1e-4)
    # the default limits [100, 400] do not bind here
    assert cluster_timesteps(linear_schedule(1000), 5, "snr").bounds == c.bounds


def test_snr_cost_is_the_l1_cost_of_log_snr():
    s = cosine_schedule(400)
    c = cluster_timesteps(s, 4, "snr")
    assert c.cost == pytest.approx(interval_cost("l1", c.bounds, values=s.log_snr), rel=1e-12)
    lo, hi = default_limits(400, 4)
    assert lo <= c.sizes.min() and c.sizes.max() <= hi


def test_raw_snr_option_differs_and_is_degenerate_free_with_limits():
    s = linear_schedule(1000)
    raw = cluster_timesteps(s, 5, "snr", snr="raw")
    log = cluster_timesteps(s, 5, "snr")
    assert raw.bounds != log.bounds
    assert raw.sizes.min() >= 100  # the default limits prevent [0],[1-2],... clusters
    assert raw.meta["snr"] == "raw"


def test_gradient_objective_full_and_binned_agree_on_block_affinity():
    T, k = 200, 4
    # block-structured affinity: 1 inside each block of 50, 0.1 outside
    blocks = np.arange(T) // 50
    A = np.where(blocks[:, None] == blocks[None, :], 1.0, 0.1)
    full = cluster_timesteps(linear_schedule(T), k, "gradient", affinity=A)
    assert full.bounds == (0, 50, 100, 150, 200)
    edges = np.arange(0, T + 1, 10)
    Ab = A[::10, ::10]
    binned = cluster_timesteps(linear_schedule(T), k, "gradient", affinity=Ab, bin_edges=edges)
    assert binned.bounds == full.bounds
    assert binned.meta["binned"] is True


def test_binned_gradient_respects_limits():
    T, k = 100, 2
    A = np.eye(10)  # every bin only likes itself: limits decide
    edges = np.arange(0, T + 1, 10)
    c = cluster_timesteps(linear_schedule(T), k, "gradient", affinity=A, bin_edges=edges,
                          min_size=40, max_size=60)
    assert 40 <= c.sizes.min() and c.sizes.max() <= 60
    with pytest.raises(ValueError, match="size limits"):
        cluster_timesteps(linear_schedule(T), k, "gradient", affinity=np.eye(2),
                          bin_edges=np.array([0, 5, 100]), min_size=40, max_size=60)


def test_cluster_of_numpy_torch_int():
    c = Clusters((0, 3, 7, 10), "custom")
    t = np.arange(10)
    expect = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(c.cluster_of(t), expect)
    got = c.cluster_of(torch.arange(10))
    assert got.dtype == torch.int64 and got.tolist() == expect.tolist()
    assert c.cluster_of(6) == 1 and c.cluster_of(7) == 2
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        c.cluster_of(np.array([10]))


def test_json_round_trip_and_repr():
    c = cluster_timesteps(linear_schedule(1000), 5, "snr")
    d = json.loads(c.to_json())
    assert d["bounds"] == list(c.bounds) and d["sizes"] == c.sizes.tolist()
    back = Clusters.from_json(c.to_json())
    assert back == c and back.cost == c.cost and back.meta == c.meta
    r = repr(c)
    assert "k=5" in r and "[0,153)" in r and "snr" in r


def test_numpy_integer_limits_are_stored_as_ints():
    """np.int64 limits were stored as given: to_json raised and torch.load(weights_only=True)
    refused an ANT state holding them."""
    import io

    import antdiff

    c = cluster_timesteps(linear_schedule(1000), 5, min_size=np.int64(50), max_size=np.int32(400))
    assert type(c.meta["min_size"]) is int and type(c.meta["max_size"]) is int
    assert json.loads(c.to_json())["meta"]["min_size"] == 50
    ant = antdiff.ANT(linear_schedule(1000), k=5, min_size=np.int64(50))
    buf = io.BytesIO()
    torch.save(ant.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["clusters"]["meta"]["min_size"] == 50


def test_uniform_constructor():
    assert Clusters.uniform(10, 3).bounds == (0, 3, 6, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be"),
        (dict(k=1001), "k must be"),
        (dict(k=5, objective="loss"), "objective must be"),
        (dict(k=5, objective="gradient"), "affinity"),
        (dict(k=5, objective="gradient", affinity=np.zeros((3, 3))), r"\[T, T\]"),
        (dict(k=5, min_size=300), "min_size"),
        (dict(k=5, max_size=100), "max_size"),
        (dict(k=5, min_size=-1), "min_size"),
        (dict(k=5, snr="ln"), "snr must be"),
        (dict(k=5, affinity=np.eye(1000)), "objective='gradient' only"),  # was ignored
        (dict(k=5, objective="timestep", bin_edges=[0, 1000]), "objective='gradient' only"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cluster_timesteps(linear_schedule(1000), **kwargs)


def test_bad_bounds():
    with pytest.raises(ValueError, match="increasing"):
        Clusters((0, 5, 5, 10))
    with pytest.raises(ValueError, match=r"bounds\[0\]"):
        Clusters((1, 5, 10))
    with pytest.raises(ValueError, match="bounds must be integers"):
        Clusters.from_dict({"bounds": [0, 2.7, 5]})
    assert Clusters((0, 2.0, np.int64(5))).bounds == (0, 2, 5)


def test_from_dict_checks_what_it_reads():
    """k, T and sizes must agree with the bounds (a dict that says k = 3 loaded as one cluster),
    and cost, objective, meta and bounds have their types (a text cost broke repr, a NaN one
    wrote invalid JSON, a dict of bounds was read as its keys)."""
    good = Clusters((0, 3, 10), "snr", 1.5, {"a": 1})
    assert Clusters.from_dict(good.to_dict()) == good
    by_hand = {"bounds": np.array([0, 3, 10]), "sizes": (3, 7), "k": np.int64(2), "meta": None}
    assert Clusters.from_dict(by_hand).bounds == (0, 3, 10)
    for d, match in (
        ({"bounds": [0, 5], "T": 10, "k": 3}, "k=3 does not match its bounds"),
        ({"bounds": [0, 5], "sizes": [4]}, "sizes=.4. does not match"),
        ({"bounds": [0, 5], "cost": "abc"}, "cost must be a finite number"),
        ({"bounds": [0, 5], "cost": float("nan")}, "cost must be a finite number"),
        ({"bounds": [0, 5], "objective": 3}, "objective must be text"),
        ({"bounds": {0: 1, 5: 2}}, "needs a 'bounds' list"),
        ({"bounds": [0, None]}, "bounds must be integers"),
    ):
        with pytest.raises(ValueError, match=match):
            Clusters.from_dict(d)


def test_binned_gradient_clustering_checks_limits_and_edges_first():
    """Limits no split of [0, T) can meet were blamed on the bins ("use finer bins"), and
    fractional bin edges were truncated."""
    A, edges = np.eye(10), np.arange(0, 1001, 100)  # noqa: N806
    with pytest.raises(ValueError, match="min_size=300 is infeasible for k=5"):
        cluster_timesteps("linear", 5, "gradient", affinity=A, bin_edges=edges, min_size=300)
    with pytest.raises(ValueError, match="bin_edges must be integers"):
        cluster_timesteps("linear", 2, "gradient", affinity=np.eye(2), bin_edges=[0, 499.7, 1000])
    c = cluster_timesteps("linear", 2, "gradient", affinity=np.eye(2), bin_edges=[0, 500.0, 1000])
    assert c.bounds == (0, 500, 1000)


def test_plot_writes_png(tmp_path):
    s = linear_schedule(1000)
    out = plot_clusters(cluster_timesteps(s, 5, "snr"), s, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_the_default_size_limits_are_t_over_2k_and_2t_over_k():
    """Pinned by value: another test compared sizes with default_limits() itself, so a changed
    upper limit (3T/k) passed; raw-SNR clusters of the linear schedule meet the upper one."""
    assert default_limits(1000, 5) == (100, 400)
    raw = cluster_timesteps(linear_schedule(1000), 5, "snr", snr="raw")
    assert max(raw.sizes) == 400 and min(raw.sizes) >= 100


def _affinity_file(tmp_path, sched, T=None):
    """An affinity .npz as ``antdiff affinity`` writes it, recording ``sched``'s name and T."""
    from antdiff.analysis import AffinityResult

    edges = np.linspace(0, sched.T, 11).astype(np.int64)
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (10, 10))
    a = (a + a.T) / 2
    np.fill_diagonal(a, 1.0)
    meta = {"T": sched.T if T is None else T, "schedule": sched.name}
    return AffinityResult(a, edges, 8, 1, meta).save(tmp_path / "aff.npz"), a, edges


def test_an_affinity_file_is_checked_against_the_schedule_it_clusters(tmp_path):
    from antdiff.clustering import load_affinity

    lin = linear_schedule(1000)
    path, a, edges = _affinity_file(tmp_path, lin)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # measured on this schedule: silent
        got, got_edges = load_affinity(path, schedule=lin)
    np.testing.assert_array_equal(got, a)
    np.testing.assert_array_equal(got_edges, edges)
    with pytest.warns(UserWarning, match=r"measured on the linear\(T=1000\) schedule.*cosine"):
        load_affinity(path, schedule=cosine_schedule(1000))
    # compared as arrays: the same schedule under another name is silent, another one as an
    # unnamed array (float32, as a diffusers scheduler holds it) is not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_affinity(path, schedule=Schedule(lin.alphas_cumprod.astype(np.float32), "my.npy"))
    with pytest.warns(UserWarning, match="measured on the linear") as said:
        cluster_timesteps(cosine_schedule(1000).alphas_cumprod, 4, "gradient", affinity=path)
    assert said[0].filename == __file__  # the caller's line, not the library's
    with pytest.raises(ValueError, match=r"measured with T=1000 timesteps.*T=500"):
        load_affinity(path, schedule=linear_schedule(500))
    load_affinity(path)  # without a schedule: no check
    np.savez(tmp_path / "other.npz", affinity=a, bin_edges=edges, meta=np.array("not json"))
    load_affinity(tmp_path / "other.npz", schedule=lin)  # nothing readable recorded: no check


def test_a_clusters_file_is_checked_against_the_engines_schedule(tmp_path):
    from antdiff import ANT

    lin, cos = linear_schedule(1000), cosine_schedule(1000)
    path = tmp_path / "c.json"
    path.write_text(cluster_timesteps(lin, 5, "snr").to_json())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found on this schedule (also as a float32 array): silent
        ANT(lin, clustering=str(path), method="uw")
        ANT(Schedule(lin.alphas_cumprod.astype(np.float32), "custom"), clustering=path)
    with pytest.warns(UserWarning, match=r"c\.json were found on the linear\(T=1000\) sch.*cosine"
                      ) as said:  # fmt: skip
        ANT(cos, clustering=path, method="uw")
    assert said[0].filename == __file__  # the caller's line
    with pytest.warns(UserWarning, match=r"clusters given were found on the linear"):
        ANT(cos, clustering=Clusters.load(path), method="uw")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the uniform split holds on any schedule; clusters of a custom array have no record
        ANT(cos, clustering=cluster_timesteps(lin, 5, "timestep"), method="uw")
        ANT(cos, clustering=cluster_timesteps(lin.alphas_cumprod, 5, "snr"), method="uw")


def test_cluster_timesteps_reads_an_affinity_file(tmp_path):
    lin = linear_schedule(1000)
    path, a, edges = _affinity_file(tmp_path, lin)
    want = cluster_timesteps(lin, 4, "gradient", affinity=a, bin_edges=edges)
    for p in (path, str(path)):
        assert cluster_timesteps(lin, 4, "gradient", affinity=p).bounds == want.bounds
    with pytest.raises(ValueError, match="holds its own bin edges"):
        cluster_timesteps(lin, 4, "gradient", affinity=path, bin_edges=edges)
    with pytest.raises(ValueError, match=r"T=1000.*T=500"):  # checked against the schedule
        cluster_timesteps(linear_schedule(500), 4, "gradient", affinity=path)


def test_clusters_load_reads_what_cluster_json_writes(tmp_path):
    c = cluster_timesteps(cosine_schedule(200), 4)
    path = tmp_path / "c.json"
    path.write_text(c.to_json())
    back = Clusters.load(path)
    assert back.bounds == c.bounds and back.objective == c.objective and back.cost == c.cost
    assert Clusters.load(str(path)).bounds == c.bounds
    assert Clusters.from_json(path.read_bytes()).bounds == c.bounds  # text or bytes
    with pytest.raises(FileNotFoundError, match="is a folder"):
        Clusters.load(tmp_path)
    with pytest.raises(ValueError, match=r"takes JSON text.*Clusters.load\(path\)"):
        Clusters.from_json(str(path))
    with pytest.raises(FileNotFoundError, match="antdiff cluster --json"):
        Clusters.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not a clusters JSON file"):
        Clusters.load(tmp_path / "bad.json")


# -- bounds, types, limits, binned gradient costs, affinity files ------------------------------


def test_clusters_bounds_are_plain_ints_and_need_two_entries():
    """Bounds are stored as plain ints (an np.int64 kept as given broke to_json), a bool is
    not a timestep index, and one entry is no cluster at all."""
    c = Clusters((0, 2.0, np.int64(5)))
    assert [type(b) for b in c.bounds] == [int, int, int]
    assert json.loads(c.to_json())["bounds"] == [0, 2, 5]
    with pytest.raises(ValueError, match="bounds must be integers"):
        Clusters((0, True, 3))
    with pytest.raises(ValueError, match="at least 2 entries"):
        Clusters((0,))


def test_cluster_of_range_and_return_types():
    """An int gives an int; a negative int or array raises (numpy path); a torch tensor is not
    range-checked but maps t < 0 to cluster 0 and t >= T to cluster k - 1 (the docstring)."""
    c = Clusters((0, 3, 7, 10))
    got = c.cluster_of(6)
    assert type(got) is int and got == 1
    for bad in (-1, np.array([0, -1])):
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            c.cluster_of(bad)
    out = c.cluster_of(torch.tensor([-5, -1, 0, 9, 10, 11, 1000]))
    assert out.tolist() == [0, 0, 0, 2, 2, 2, 2]


def test_from_dict_checks_T_and_refuses_a_bool_cost_and_a_path_for_json(tmp_path):
    for d, match in (
        ({"bounds": [0, 5], "T": 10}, "T=10 does not match its bounds"),
        ({"bounds": [0, 5], "cost": True}, "cost must be a finite number"),
    ):
        with pytest.raises(ValueError, match=match):
            Clusters.from_dict(d)
    path = tmp_path / "c"  # a path object, whatever its name, is not JSON text
    path.write_text(Clusters((0, 5)).to_json())
    with pytest.raises(ValueError, match="takes JSON text"):
        Clusters.from_json(path)


def test_default_limits_are_t_over_2k_and_2t_over_k_rounded_outwards():
    """floor(T / 2k) (at least 1) and ceil(2T / k), in exact rational arithmetic, and always
    feasible: k > T / 2 made the lower limit 0, which cluster_timesteps then refused."""
    from fractions import Fraction

    from antdiff.interval_dp import validate_sizes

    for T in (1, 2, 7, 10, 97, 1000, 1003):  # noqa: N806
        for k in range(1, min(T, 13) + 1):
            want = (max(1, math.floor(Fraction(T, 2 * k))), math.ceil(Fraction(2 * T, k)))
            assert default_limits(T, k) == want, (T, k)
            validate_sizes(T, k, *want)  # feasible
    c = cluster_timesteps(cosine_schedule(10), 6)  # T / 2k < 1: min_size 1
    assert c.k == 6 and c.meta["min_size"] == 1


def test_backend_and_binned_flag_reach_the_result():
    """backend= is handed to the DP (a bad one is refused, not ignored), and meta['binned']
    says whether the affinity was per bin."""
    lin = linear_schedule(100)
    eye, edges = np.eye(100), np.arange(0, 101, 10)
    for objective, extra in (("snr", {}), ("gradient", {"affinity": eye}),
                             ("gradient", {"affinity": np.eye(10), "bin_edges": edges})):
        with pytest.raises(ValueError, match="backend must be one of"):
            cluster_timesteps(lin, 4, objective, backend="gpu", **extra)
    assert cluster_timesteps(lin, 4, "gradient", affinity=eye).meta["binned"] is False
    assert cluster_timesteps(lin, 4, "gradient", affinity=np.eye(10),
                             bin_edges=edges).meta["binned"] is True  # fmt: skip


def test_bool_k_and_size_limits_are_value_errors():
    for kwargs, match in ((dict(k=True), "k must be an integer"),
                          (dict(k=5, min_size=True), "min_size must be a positive integer"),
                          (dict(k=5, max_size=False), "max_size must be a positive integer")):
        with pytest.raises(ValueError, match=match):
            cluster_timesteps(linear_schedule(1000), **kwargs)


def test_bin_edges_must_run_from_0_to_T_without_repeats_and_k_fit_the_bins():
    lin = linear_schedule(100)
    free = {"min_size": None, "max_size": None}
    for edges in ([10, 50, 100], [0, 50, 90], [0, 50, 50, 100]):
        n = len(edges) - 1
        with pytest.raises(ValueError, match="bin_edges must be strictly increasing ints from 0"):
            cluster_timesteps(lin, 2, "gradient", affinity=np.ones((n, n)), bin_edges=edges, **free)
    with pytest.raises(ValueError, match="k=3 exceeds the number of bins"):
        cluster_timesteps(lin, 3, "gradient", affinity=np.eye(2), bin_edges=[0, 50, 100], **free)
    # the only split on these edges breaks one limit only: the lower, then the upper
    for edges, limits in (([0, 10, 100], (20, 90)), ([0, 90, 100], (5, 80))):
        with pytest.raises(ValueError, match="no split on these bin edges satisfies"):
            cluster_timesteps(lin, 2, "gradient", affinity=np.eye(2), bin_edges=edges,
                              min_size=limits[0], max_size=limits[1])  # fmt: skip


def _binned_brute_force(A, edges, k, lo, hi):  # noqa: N803
    """Best split on the bin edges of the per-timestep expansion of A, by the module docstring:
    cost of [l, r) = -sum_t A[bin(c), bin(t)], c = l + (r - l - 1) // 2; ties to the split
    whose points, read from the last backwards, are smallest."""
    T = int(edges[-1])  # noqa: N806
    bin_of = np.repeat(np.arange(len(edges) - 1), np.diff(edges))
    best = None
    for splits in itertools.combinations([int(e) for e in edges[1:-1]], k - 1):
        b = (0, *splits, T)
        sizes = np.diff(b)
        if (lo is not None and sizes.min() < lo) or (hi is not None and sizes.max() > hi):
            continue
        total = 0.0
        for l, r in zip(b[:-1], b[1:]):
            c = l + (r - l - 1) // 2
            total -= sum(float(A[bin_of[c], bin_of[t]]) for t in range(l, r))
        if best is None or (total, splits[::-1]) < best[:2]:
            best = (total, splits[::-1], b)
    return best


def test_binned_gradient_matches_brute_force_on_uneven_bins():
    """The binned cost (each bin weighted by its width, the middle timestep's bin as c, the
    size limits exact at both ends) against the expanded matrix, brute force."""
    from antdiff.interval_dp import validate_sizes

    rng = np.random.default_rng(0)
    cases = [(np.eye(10), np.arange(0, 101, 10), 2, 40, 60)]  # all tie: the limits decide
    for _ in range(12):
        widths = rng.integers(1, 6, size=6)
        edges = np.r_[0, np.cumsum(widths)]
        A = rng.integers(-3, 4, size=(6, 6)).astype(float)  # noqa: N806  (exact sums)
        lo, hi = sorted(int(w) for w in rng.choice(widths, 2))  # sizes that bins can meet
        cases += [(A, edges, k, *limits) for k in (1, 2, 3)
                  for limits in ((None, None), (lo, 2 * hi))]  # fmt: skip
    for A, edges, k, lo, hi in cases:  # noqa: N806
        T = int(edges[-1])  # noqa: N806
        try:
            validate_sizes(T, k, lo, hi)
        except ValueError:
            continue  # limits no split of [0, T) meets: tested elsewhere
        want = _binned_brute_force(A, edges, k, lo, hi)
        kw = dict(affinity=A, bin_edges=edges, min_size=lo, max_size=hi)
        if want is None:
            with pytest.raises(ValueError, match="no split on these bin edges"):
                cluster_timesteps(cosine_schedule(T), k, "gradient", **kw)
            continue
        c = cluster_timesteps(cosine_schedule(T), k, "gradient", **kw)
        assert c.bounds == want[2], (edges.tolist(), k, lo, hi)
        assert c.cost == pytest.approx(want[0], abs=1e-9)


def test_load_affinity_refuses_a_non_square_matrix_and_reads_sibling_edges(tmp_path):
    from antdiff.clustering import load_affinity

    np.save(tmp_path / "rect.npy", np.ones((3, 4)))
    with pytest.raises(ValueError, match="must be a square matrix"):
        load_affinity(tmp_path / "rect.npy")
    a, edges = np.eye(4), np.array([0, 10, 20, 30, 40])
    np.save(tmp_path / "a.npy", a)
    assert load_affinity(tmp_path / "a.npy")[1] is None
    np.save(tmp_path / "a_edges.npy", edges)
    got, got_edges = load_affinity(tmp_path / "a.npy")
    np.testing.assert_array_equal(got, a)
    np.testing.assert_array_equal(got_edges, edges)


def test_plot_refuses_clusters_of_another_T(tmp_path):
    with pytest.raises(ValueError, match="schedule has T=1000 but the clusters cover T=500"):
        plot_clusters(Clusters.uniform(500, 5), linear_schedule(1000), tmp_path / "c.png")
    assert not list(tmp_path.iterdir())
