"""Walkthrough of `antdiff train` as a new user: with --train.micro_batch the logged `loss` is
the same quantity for every method, and under torchrun the micro-batch hint names sizes the
config takes."""

from __future__ import annotations

import re

import pytest
import torch

from antdiff.config import load_config
from antdiff.train_dist import DistContext


def test_dist_micro_batch_hint_names_valid_sizes():
    # torchrun --nproc_per_node 2 -m antdiff train --config digits_adm --train.device cpu
    #   --train.batch_size 20 --train.micro_batch 5          (k = 5)
    # says "use e.g. 2 or 4"; both are then refused ("smaller than ant.k=5")
    from antdiff.train import build_run

    ctx = DistContext(rank=0, world=2, local_rank=0, device=torch.device("cpu"), owns_group=False)
    args = ["--train.batch_size", "20", "--train.device", "cpu"]
    cfg = load_config("digits_adm", [*args, "--train.micro_batch", "5"])
    with pytest.raises(ValueError, match="micro_batch=5") as exc:
        build_run(cfg, dist=ctx)  # refused before any collective
    hint = [int(v) for v in re.findall(r"\d+", str(exc.value).split("use e.g.")[1])]
    assert hint
    for m in hint:  # every suggested size must be one the config accepts
        load_config("digits_adm", [*args, "--train.micro_batch", str(m)])
    # so must the batch sizes suggested for a batch the processes do not divide (5 on 2
    # ranks suggested 4, below k = 5)
    cfg = load_config("digits_adm", ["--train.batch_size", "5", "--train.device", "cpu"])
    with pytest.raises(ValueError, match="batch_size=5 is GLOBAL") as exc:
        build_run(cfg, dist=ctx)
    hint = [int(v) for v in re.findall(r"\d+", str(exc.value).split("use e.g.")[1])]
    assert hint == [6, 8]
    for b in hint:
        load_config("digits_adm", ["--train.batch_size", str(b), "--train.device", "cpu"])


def _row(out_dir, step):
    import csv

    with open(out_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return next(r for r in rows if int(r["step"]) == step)


def test_micro_batch_loss_column_is_the_same_quantity_for_every_method(tmp_path):
    # README: "`loss` is the mean of the clusters' losses, the same quantity for every method".
    # Same seed, batch, timesteps and noise at step 1: uw and pcgrad see identical cluster
    # losses (loss_c* agree) but logged loss 1.02653 (uw, vanilla) vs 1.01086 (pcgrad, nash).
    from antdiff.train import train

    rows = {}
    for method in ("uw", "pcgrad"):
        out = tmp_path / method
        cfg = load_config("digits_adm", [
            "--ant.method", method, "--ant.sampling", "uniform", "--train.batch_size", "6",
            "--train.micro_batch", "3", "--train.steps", "1", "--train.log_every", "1",
            "--train.progress", "false", "--sample.steps", "1", "--sample.n", "1",
            "--train.out_dir", str(out),
        ])  # fmt: skip
        train(cfg)
        rows[method] = _row(out, 1)
    k = 5
    for method, row in rows.items():
        per = [float(row[f"loss_c{i + 1}"]) for i in range(k)]
        per = [v for v in per if v == v]  # absent clusters are nan
        assert float(row["loss"]) == pytest.approx(sum(per) / len(per), rel=1e-4), method
    assert float(rows["uw"]["loss"]) == pytest.approx(float(rows["pcgrad"]["loss"]), rel=1e-4)
