"""Multi-process training (gloo, CPU, 2 processes): micro mode with an empty rank after an
update_every off-step does not hang (DDP's bucket rebuild is a collective at the next forward),
and a busy out_dir is refused as in use on every rank under torchrun."""

from __future__ import annotations

import datetime
import os
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from antdiff import ANT
from antdiff.schedules import linear_schedule

T, B, WORLD = 100, 16, 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.emb, self.out = nn.Linear(6, 16), nn.Embedding(T, 16), nn.Linear(16, 6)

    def forward(self, x, t):
        return self.out(torch.tanh(self.inp(x) + self.emb(t)))


def _micro_offstep_then_empty_rank(rank: int, init_file: str, result_dir: str) -> None:
    """Nash-MTL (update_every=2) in micro mode: an on-step, an off-step (DDP's own synced
    backward), then an on-step on which rank 0's slice is empty. Each rank writes whether it
    finished (a 10 s collective timeout turns a hang into an error)."""
    os.environ["ANT_KERNELS_BACKEND"] = "torch"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=10))
    outcome = "ok"
    try:
        torch.manual_seed(0)
        net = Net()
        model = nn.parallel.DistributedDataParallel(net)
        ant = ANT(linear_schedule(T), k=4, method="nash", update_every=2, mode="micro",
                  seed=0, model=model)  # fmt: skip
        opt = torch.optim.SGD(net.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(2)
        for split in (8, 8, 0):  # rank 0 holds [0, split) of the cluster-sorted batch
            x, t = torch.randn(B, 6, generator=g), torch.randint(0, T, (B,), generator=g)
            t, order = t.sort()
            x = x[order]
            sl = slice(0, split) if rank == 0 else slice(split, B)
            opt.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ant.backward(lambda xb, tb: ((model(xb, tb) - torch.sin(xb)) ** 2).mean(1),
                             x[sl], t[sl])  # fmt: skip
            ant.step(opt)
    except Exception as e:  # noqa: BLE001 -- reported to the test
        outcome = f"{type(e).__name__}: {str(e)[:200]}"
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    os._exit(0)  # a timed-out gloo group cannot be torn down cleanly


def test_micro_mode_empty_rank_after_an_off_step_does_not_hang(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_micro_offstep_then_empty_rank,
                         args=(r, str(tmp_path / "init"), str(tmp_path)))
             for r in range(WORLD)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    got = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists()
           else "no result" for r in range(WORLD)]  # fmt: skip
    assert got == ["ok", "ok"], got


def test_a_busy_out_dir_with_checkpoints_says_in_use_on_every_rank(tmp_path):
    import socket

    from test_train_dist import _busy_worker

    from antdiff.train import out_dir_lock

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ckpt_00000005.pt").write_bytes(b"")  # the other run's first save
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with out_dir_lock(run):  # that run still trains
        mp.spawn(_busy_worker, args=(str(run), port, str(tmp_path / "said")), nprocs=WORLD)
    for r in range(WORLD):
        said = (tmp_path / f"said.{r}").read_text()
        assert said.startswith("OutDirInUse: ") and "in use by another" in said, said
