"""antdiff.memory.peak_allocated, and the engine's peak memory against the kP budget."""

from __future__ import annotations

import pytest
import torch

from antdiff import ANT
from antdiff.diffusion import GaussianDiffusion
from antdiff.memory import peak_allocated
from antdiff.models import create_model

MB = 2**20


def test_peak_of_known_allocations():
    def build():
        def run():
            a = torch.empty(MB, dtype=torch.uint8)
            b = torch.empty(2 * MB, dtype=torch.uint8)
            del a
            c = torch.empty(MB // 2, dtype=torch.uint8)
            del b, c

        return run

    assert peak_allocated(build, repeat=3) == 3 * MB


def test_blocks_from_build_freed_in_the_run_are_subtracted():
    def build():
        held = [torch.empty(4 * MB, dtype=torch.uint8)]

        def run():
            if held:
                held.pop()  # the first call frees the 4 MB block built outside the run
            x = torch.empty(3 * MB, dtype=torch.uint8)
            del x

        return run

    assert peak_allocated(build) == 0  # 4 MB freed before the 3 MB block exists


def test_peak_is_the_largest_over_the_repeated_calls():
    """Each of the ``repeat`` calls is measured: a second call that allocates more (state
    built lazily on the first) sets the peak."""

    def build():
        calls = []

        def run():
            calls.append(1)
            x = torch.empty(len(calls) * MB, dtype=torch.uint8)
            del x

        return run

    assert peak_allocated(build, repeat=1) == MB
    assert peak_allocated(build, repeat=3) == 3 * MB


def test_available_host_bytes_reads_kib(monkeypatch):
    """/proc/meminfo counts in KiB (its "kB")."""
    from pathlib import Path

    from antdiff import utils
    from antdiff.utils import available_host_bytes

    text = "MemTotal:       4096 kB\nMemFree:         100 kB\nMemAvailable:    2048 kB\n"
    monkeypatch.setattr(utils, "cgroup_free_bytes", lambda: None)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text)
    assert available_host_bytes() == 2048 * 1024


def _cgroup_files(d, **files):
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_", ".", 1)).write_text(text)


def test_cgroup_v2_limit_of_the_process_and_its_parents(tmp_path):
    """A container's memory.max caps what the host reports: the limit less the usage that is not
    reclaimable file cache (page cache, less shared memory), the least over the cgroup and its
    parents."""
    from antdiff.utils import cgroup_free_bytes

    proc = tmp_path / "cgroup"
    proc.write_text("0::/pod/job\n")
    root = tmp_path / "fs"
    _cgroup_files(root, memory_max="max\n")
    _cgroup_files(root / "pod", memory_max="10000\n", memory_current="3000\n",
                  memory_stat="anon 1800\nfile 1500\nshmem 300\n")  # fmt: skip
    _cgroup_files(root / "pod" / "job", memory_max="max\n", memory_current="2500\n")
    assert cgroup_free_bytes(root, proc) == 10000 - (3000 - (1500 - 300))
    _cgroup_files(root / "pod" / "job", memory_max="4000\n", memory_current="2500\n",
                  memory_stat="active_file 400\nfile 500\n")  # fmt: skip
    assert cgroup_free_bytes(root, proc) == 4000 - (2500 - 500)
    _cgroup_files(root / "pod", memory_max="max\n")
    _cgroup_files(root / "pod" / "job", memory_max="max\n")
    assert cgroup_free_bytes(root, proc) is None


def test_cgroup_v1_memory_controller(tmp_path):
    """cgroup v1: the memory controller's line, its own mount, "no limit" written as a huge
    number; a namespaced path that is not under the mount reads the mount's root."""
    from antdiff.utils import cgroup_free_bytes

    proc = tmp_path / "cgroup"
    proc.write_text("5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n")
    root = tmp_path / "fs"
    mem = root / "memory"
    _cgroup_files(mem, memory_limit_in_bytes="9223372036854771712\n",
                  memory_usage_in_bytes="50\n")  # fmt: skip
    _cgroup_files(mem / "docker" / "abc", memory_limit_in_bytes="8192\n",
                  memory_usage_in_bytes="6000\n",
                  memory_stat="cache 9\ntotal_cache 1200\ntotal_shmem 200\n")  # fmt: skip
    assert cgroup_free_bytes(root, proc) == 8192 - (6000 - (1200 - 200))
    proc.write_text("4:memory:/elsewhere/zzz\n")  # not under this mount: the mount's own
    _cgroup_files(mem, memory_limit_in_bytes="700\n", memory_usage_in_bytes="800\n")
    assert cgroup_free_bytes(root, proc) == 0  # over its limit: nothing to give
    assert cgroup_free_bytes(root, tmp_path / "missing") is None


def test_available_host_bytes_is_capped_by_the_cgroup(monkeypatch):
    from pathlib import Path

    from antdiff import utils

    text = "MemAvailable:    2048 kB\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text)
    monkeypatch.setattr(utils, "cgroup_free_bytes", lambda: 1000)
    assert utils.available_host_bytes() == 1000
    monkeypatch.setattr(utils, "cgroup_free_bytes", lambda: 1 << 40)
    assert utils.available_host_bytes() == 2048 * 1024


def test_bad_arguments():
    with pytest.raises(ValueError, match="repeat"):
        peak_allocated(lambda: lambda: None, repeat=0)
    with pytest.raises(ValueError, match="device"):
        peak_allocated(lambda: lambda: None, device="meta")


# name -> (registry size, batch, class-conditional): the benchmark's step models
MODELS = {"unet": ("adm-tiny", 32, False), "dit": ("dit-tiny", 128, True)}


def _step(model_name: str, method: str, mode: str):
    """Builder of one training step (fresh model, AdamW) as benchmarks/bench_step.py runs it."""
    size, B, cond = MODELS[model_name]

    def build():
        torch.manual_seed(0)
        model = create_model(size)
        shape = (B, model.in_channels, 8, 8)
        x, noise = torch.randn(shape), torch.randn(shape)
        y = torch.randint(0, 10, (B,))
        diffusion = GaussianDiffusion("linear")

        def loss_fn(batch, t):
            x0, eps, labels = batch
            kw = {"y": labels} if cond else None
            return diffusion.training_losses(model, x0, t, eps, kw)["loss"]

        if method == "vanilla":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def vanilla():
                opt.zero_grad(set_to_none=True)
                t = torch.randint(0, 1000, (B,))
                loss_fn((x, noise, y), t).mean().backward()
                opt.step()

            return vanilla
        ant = ANT("linear", k=5, method=method, mode=mode).attach(model)
        opt = torch.optim.AdamW([{"params": list(model.parameters())}, *ant.param_groups()])

        def step():
            opt.zero_grad(set_to_none=True)
            t = ant.sample_timesteps(B)
            ant.backward(loss_fn, (x, noise, y), t)
            ant.step(opt)

        return step

    return build


@pytest.mark.parametrize("model_name", ["unet", "dit"])
def test_gradient_method_peak_within_vanilla_plus_1_1_kP(model_name):
    """The issue's budget: peak(gradient method) <= peak(vanilla) + 1.1 * k * P * 4 bytes."""
    P = sum(p.numel() for p in create_model(MODELS[model_name][0]).parameters())
    budget = 1.1 * 5 * P * 4
    vanilla = peak_allocated(_step(model_name, "vanilla", ""))
    assert vanilla > 10 * MB  # activations, gradients, AdamW state: the measurement sees them
    for method, mode in (("pcgrad", "onepass"), ("pcgrad", "micro"), ("graddrop", "onepass")):
        extra = peak_allocated(_step(model_name, method, mode)) - vanilla
        assert extra <= budget, (
            f"{method} {mode}: +{extra / MB:.2f} MiB > budget {budget / MB:.2f} MiB"
        )
