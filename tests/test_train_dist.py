"""The trainer under torch.distributed (2 processes, gloo, CPU) equals one process on the global
batch: same final weights on every rank and in the checkpoint, same logged cluster weights.

The workers set the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), so train() takes the same init path as under
``torchrun --nproc_per_node 2 -m antdiff train ...``.
"""

from __future__ import annotations

import csv
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from antdiff.clustering import cluster_timesteps
from antdiff.config import load_config
from antdiff.engine.timesteps import TimestepSampler
from antdiff.schedules import linear_schedule
from antdiff.train import train
from antdiff.train_dist import DistContext, init_distributed, rank_device

WORLD, STEPS, BATCH = 2, 3, 8
# update_every 2: the gradient methods also take their cached-weight steps (synced by DDP)
METHODS = {
    "uw": [],
    "pcgrad": ["--ant.update_every", "2"],
    "nash": [],  # update_every 25: steps 2 and 3 reuse the step-1 weights
    "uw+pcgrad": ["--ant.update_every", "2"],
    # two micro-batches of 10 a step, each rank holding 5 of each (ant.backward's windows)
    "uw+pcgrad:micro": ["--ant.update_every", "2", "--train.batch_size", "20",
                        "--train.micro_batch", "10"],
    "uw:micro": ["--train.batch_size", "20", "--train.micro_batch", "10"],
}  # fmt: skip


def _cfg(out, name):
    extra = METHODS[name]
    batch = [] if "--train.batch_size" in extra else ["--train.batch_size", str(BATCH)]
    return load_config(
        "digits_adm",
        ["--ant.method", name.partition(":")[0], *extra, *batch, "--train.steps", str(STEPS),
         "--train.log_every", "1", "--train.ckpt_every",
         str(STEPS), "--train.progress", "false", "--train.device", "cpu", "--sample.steps", "1",
         "--sample.n", "1", "--train.out_dir", str(out)],
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, root: str, ports: list[int]) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1"
    )
    for method, port in zip(METHODS, ports):
        os.environ["MASTER_PORT"] = str(port)
        s = train(_cfg(f"{root}/dist_{method}", method))
        final = {k: v.clone() for k, v in s["run"].model.state_dict().items()}
        torch.save(final, f"{root}/rank{rank}_{method}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_dist")
    ports = [_free_port() for _ in METHODS]
    mp.spawn(_worker, args=(str(root), ports), nprocs=WORLD)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in METHODS:  # the reference: one process, the same global batch and seed
            train(_cfg(root / f"single_{method}", method))
    finally:
        torch.set_num_threads(n)
    return root


def _ckpt(run_dir):
    files = sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))
    assert [f.name for f in files] == [f"ckpt_{STEPS:08d}.pt"]
    return torch.load(files[0], weights_only=True)


def _weights(run_dir):
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    return np.array([[float(r[f"weight_c{i}"]) for i in range(1, 6)] for r in rows])


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_equal_one_process(runs, method):
    dist_ck, single_ck = _ckpt(runs / f"dist_{method}"), _ckpt(runs / f"single_{method}")
    assert dist_ck["step"] == single_ck["step"] == STEPS
    # the weights moved away from the EMA's start (not a comparison of two initialisations)
    assert any(not torch.equal(v, single_ck["ema"][k]) for k, v in single_ck["model"].items())
    # Equal up to float rounding (the rank partial sums add in another order). AdamW divides
    # each coordinate by its own RMS, so in a coordinate whose gradient nearly cancels the
    # rounding becomes a weight difference of order lr * rounding / |g|: a few coordinates in
    # 10^5 may differ by ~1e-6, where a wrong batch, timestep or noise shifts them by ~lr.
    lr = dist_ck["config"]["train"]["lr"]
    for part in ("model", "ema"):
        diff = torch.cat(
            [(dist_ck[part][k] - v).abs().flatten() for k, v in single_ck[part].items()]
        )
        assert diff.max() <= 0.02 * lr, (part, diff.max())
        assert (diff > 1e-6).sum() <= 10, (part, (diff > 1e-6).sum())
    # every rank ends with bit-identical weights (same all-reduced gradients, same steps)
    r0, r1 = (torch.load(runs / f"rank{r}_{method}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert all(torch.equal(r0[k], dist_ck["model"][k]) for k in r0)
    # the same cluster weights were logged (CSV keeps 6 significant digits)
    np.testing.assert_allclose(
        _weights(runs / f"dist_{method}"), _weights(runs / f"single_{method}"), rtol=2e-5
    )
    # the engine's method state (UW log-variances, Nash weights, sampler) matches too
    a, b = dist_ck["ant"], single_ck["ant"]
    assert a["sampler"] == b["sampler"] and a["step"] == b["step"]
    if b["w"] is not None:
        torch.testing.assert_close(a["w"], b["w"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- helpers, no process group
def _ctx(rank: int, world: int) -> DistContext:
    return DistContext(rank, world, rank, torch.device("cpu"), owns_group=False)


def test_shards_partition_the_cluster_sorted_global_batch():
    clusters = cluster_timesteps(linear_schedule(1000), 5, "snr")
    sampler = TimestepSampler(clusters, "proportional", seed=3)
    B, world = 12, 3  # noqa: N806
    t, counts = sampler.sample(B)
    batch = {"x": torch.arange(B * 2).reshape(B, 2), "noise": torch.randn(B, 2)}
    got_t, got_x = [], []
    for rank in range(world):
        sampler.remember(t, counts)  # each rank sees the same global draw
        local, lt = _ctx(rank, world).shard(batch, t, sampler)
        assert lt.shape[0] == local["x"].shape[0] == local["noise"].shape[0] == B // world
        # the host counts handed to the engine are the slice's true cluster counts
        ref = np.bincount(clusters.cluster_of(lt).numpy(), minlength=5)
        assert sampler.counts_for(lt).tolist() == ref.tolist()
        got_t.append(lt)
        got_x.append(local["x"])
    assert torch.equal(torch.cat(got_t), t) and torch.equal(torch.cat(got_x), batch["x"])


def test_global_batch_must_divide_among_the_processes():
    with pytest.raises(ValueError, match=r"train.batch_size=10 is GLOBAL.*\(4\); use e.g. 8 or 12"):
        _ctx(0, 4).check_batch(10)
    _ctx(0, 4).check_batch(12)
    # the suggestions divide the batch too: 4 and 12 for a batch of 12 (8 does not divide it)
    with pytest.raises(ValueError, match=r"train.micro_batch=6 is GLOBAL.*\(4\); use e.g. 4 or 12"):
        _ctx(0, 4).check_batch(12, 6)
    _ctx(0, 4).check_batch(24, 8)


def test_device_per_process():
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        rank_device("cuda:1", 0)
    assert rank_device("cpu", 1) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            rank_device("cuda", 0)


def test_collective_timeout_is_set_and_checked(monkeypatch):
    """The process group took NCCL's 10-minute default, which a large checkpoint's write on
    rank 0 can outlast while the others wait at the barrier."""
    import datetime

    from antdiff import train_dist

    seen = {}
    monkeypatch.setattr(train_dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train_dist.dist, "init_process_group",
                        lambda backend, **kw: seen.update(backend=backend, **kw))  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("ANT_DIST_TIMEOUT", raising=False)
    assert init_distributed("cpu") is not None
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=30)}
    monkeypatch.setenv("ANT_DIST_TIMEOUT", "90")
    init_distributed("cpu")
    assert seen["timeout"] == datetime.timedelta(minutes=90)
    for bad in ("0", "-5", "soon", "inf"):
        monkeypatch.setenv("ANT_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match="ANT_DIST_TIMEOUT must be a positive number"):
            init_distributed("cpu")


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("auto") is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("auto") is None


def _resume_cfg(out, steps):
    return load_config(
        "digits_adm",
        ["--ant.method", "uw", "--model.overrides.dropout", "0.3", "--train.steps", str(steps),
         "--train.batch_size", str(BATCH), "--train.log_every", "1", "--train.ckpt_every", "2",
         "--train.progress", "false", "--train.device", "cpu", "--sample.steps", "1",
         "--sample.n", "1", "--train.out_dir", str(out)],
    )  # fmt: skip


def _resume_worker(rank: int, root: str, ports: list[int]) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1"
    )
    for port, (name, steps, resume) in zip(ports, [("full", 4, None), ("split", 2, None),
                                                   ("split", 4, True)]):  # fmt: skip
        os.environ["MASTER_PORT"] = str(port)
        s = train(_resume_cfg(f"{root}/{name}", steps), resume=resume)
        if rank == 1 and steps == 4:  # rank 1: its dropout stream is not in the checkpoint
            torch.save(s["run"].model.state_dict(), f"{root}/{name}_final.pt")


@pytest.mark.slow
def test_resume_with_dropout_is_bit_exact_under_two_processes(tmp_path):
    """Every rank reseeds its model RNG (dropout) from (seed, step, rank) at each step, so 2 +
    resume + 2 steps equal 4 unbroken steps although only rank 0's RNG state is saved."""
    mp.spawn(_resume_worker, args=(str(tmp_path), [_free_port() for _ in range(3)]),
             nprocs=WORLD)  # fmt: skip
    full = torch.load(tmp_path / "full_final.pt", weights_only=True)
    split = torch.load(tmp_path / "split_final.pt", weights_only=True)
    assert full.keys() == split.keys()
    for key in full:
        assert torch.equal(full[key], split[key]), key


def _busy_worker(rank: int, out: str, port: int, said: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    try:
        train(_cfg(out, "uw"))
        msg = "trained"
    except Exception as exc:  # noqa: BLE001 -- what each rank was told
        msg = f"{type(exc).__name__}: {exc}"
    with open(f"{said}.{rank}", "w") as f:
        f.write(msg)


def test_a_busy_out_dir_refuses_every_rank(tmp_path):
    """Another run holds the out_dir: rank 0 refused after DDP's first collective and the other
    ranks went on into the step's all-reduce (a hang until the collective's timeout, outside
    torchrun). Every rank must raise, at once."""
    from antdiff.train import out_dir_lock

    (tmp_path / "run").mkdir()
    with out_dir_lock(tmp_path / "run"):
        mp.spawn(_busy_worker, args=(str(tmp_path / "run"), _free_port(), str(tmp_path / "said")),
                 nprocs=WORLD)  # fmt: skip
    for r in range(WORLD):
        said = (tmp_path / f"said.{r}").read_text()
        assert said.startswith("OutDirInUse: train.out_dir=") and "in use by another" in said
    # any other failure to take the folder (here its parent is a file) reaches every rank too
    (tmp_path / "afile").write_text("")
    mp.spawn(_busy_worker, args=(str(tmp_path / "afile" / "run"), _free_port(),
                                 str(tmp_path / "said2")), nprocs=WORLD)  # fmt: skip
    assert (tmp_path / "said2.0").read_text().startswith("NotADirectoryError")
    said = (tmp_path / "said2.1").read_text()
    assert said.startswith("RuntimeError: rank 0 could not take train.out_dir=") and (
        "Not a directory" in said
    ), said


def test_model_rng_differs_per_rank_and_step():
    """seed_model_rng: dropout masks must differ between ranks (and steps), and be fixed by
    (seed, step, rank)."""
    from antdiff.train_dist import DistContext

    def draw(rank, step):
        with torch.random.fork_rng(devices=[]):
            DistContext(rank, 2, rank, torch.device("cpu"), False).seed_model_rng(7, step)
            return torch.rand(8)

    assert torch.equal(draw(0, 3), draw(0, 3))
    assert not torch.equal(draw(0, 3), draw(1, 3))
    assert not torch.equal(draw(0, 3), draw(0, 4))


def test_local_rank_defaults_to_the_rank(monkeypatch):
    """Launched with RANK / WORLD_SIZE but no LOCAL_RANK (one node), process r is local rank r
    (its GPU cuda:r), not 0 for all."""
    import torch.distributed as tdist

    from antdiff import train_dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(tdist, "init_process_group", lambda *a, **k: None)
    seen = []
    monkeypatch.setattr(train_dist, "rank_device",
                        lambda name, lr: seen.append(lr) or torch.device("cpu"))
    ctx = train_dist.init_distributed("cpu")
    assert ctx is not None and (ctx.rank, ctx.world, ctx.local_rank) == (1, 2, 1)
    assert seen == [1]
