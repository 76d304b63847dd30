"""Shared benchmark fixtures: the machine record every result carries, and the --quick mode.

Run a suite with ``pytest benchmarks/bench_x.py --benchmark-json=raw.json`` (add ``--quick`` for
the CI-sized subset: only the cases marked ``quick``). ``pytest benchmarks`` also collects the
``bench_*.py`` files.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--quick",
        action="store_true",
        default=False,
        help="run only the CI-sized benchmark cases (marked `quick`)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "quick: a benchmark case that --quick keeps")
    # the cases read their own timings (ratios, GB/s): without them they cannot run
    workers = config.getoption("numprocesses", None) if config.pluginmanager.hasplugin(
        "xdist"
    ) else None  # fmt: skip
    if config.getoption("benchmark_disable", False) or workers:
        raise pytest.UsageError(
            "benchmarks/ measures timings, which --benchmark-disable and pytest-xdist (-n) "
            "switch off: run it without them (the tests live in tests/)"
        )


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # Named files are collected by pytest itself; this picks bench_*.py up from a directory.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--quick"):
        return
    keep = [item for item in items if item.get_closest_marker("quick")]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_sha() -> str:
    if os.environ.get("ANT_GIT_SHA"):  # a copy of the tree without .git (a remote GPU machine)
        return os.environ["ANT_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown (no commit)"
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10
    )
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@functools.lru_cache(maxsize=1)
def machine_record() -> dict[str, Any]:
    """Device, CPU model, versions and git sha; torch/triton are read without importing them."""
    cores = os.cpu_count() or 1
    return {
        "device": f"CPU, {cores} cores",
        "cpu_model": _cpu_model(),
        "cpu_cores": cores,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "git_sha": _git_sha(),
    }


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["antdiff"] = machine_record()


@pytest.fixture(scope="session")
def quick(request: pytest.FixtureRequest) -> bool:
    """Whether --quick was given."""
    return bool(request.config.getoption("--quick"))


@pytest.fixture
def bench(benchmark: Any) -> Any:
    """pytest-benchmark's fixture with the machine record in its extra_info."""
    benchmark.extra_info.update(machine_record())
    return benchmark
