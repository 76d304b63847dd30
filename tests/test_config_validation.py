"""Config validation, coercion, saved-config upgrades and peak_allocated's arithmetic: the
checks and edges that mutation testing found unguarded by the other tests."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import antdiff
from antdiff.config import (
    RESUME_FREE,
    Config,
    DiffusionConfig,
    SampleConfig,
    TrainConfig,
    _merge,
    available_presets,
    config_from_dict,
    dump_config,
    load_config,
    resume_conflicts,
    upgrade_saved_config,
)
from antdiff.memory import peak_allocated

MB = 2**20


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["--data.source", "folder", "--data.path", "imgs", "--data.channels", "2"],
         r"data.channels must be one of \[1, 3\], got 2"),
        (["--data.source", "latents", "--data.path", "z.pt", "--data.channels", "0"],
         r"data.channels must be finite and > 0, got 0"),
        (["--data.autoencoder", "vae"], r"data.autoencoder must be one of \[None, 'tiny'\]"),
        (["--data.source", "latents", "--data.path", "z.pt", "--data.random_flip", "true"],
         "store mirrored copies in the latent file.*set --data.random_flip false"),
        (["--data.latent_shift", "-0.5"], r"data.latent_shift=-0.5 applies to stored latents"),
        (["--data.latent_scale", "0.5"], r"data.latent_scale=0.5 applies to stored latents"),
        (["--data.source", "folder", "--data.path", "''"],
         "data.path is required for data.source='folder'"),
        (["--diffusion.schedule", "cosin"], r"diffusion.schedule must be one of \['linear'"),
        (["--diffusion.min_snr_gamma", "0"], r"diffusion.min_snr_gamma must be finite and > 0"),
        (["--ant.k", "0"], r"ant.k must be finite and > 0, got 0"),
        (["--ant.sampling", "stratified"], r"ant.sampling must be one of \['proportional'"),
        (["--ant.mode", "x"], r"ant.mode must be one of \['auto', 'onepass', 'micro'"),
        (["--train.log_every", "0"], r"train.log_every must be finite and > 0, got 0"),
        (["--train.sample_every", "-1"], r"train.sample_every must be finite and >= 0"),
        (["--train.ckpt_every", "-1"], r"train.ckpt_every must be finite and >= 0"),
        (["--train.num_workers", "-1"], r"train.num_workers must be finite and >= 0"),
        (["--train.out_dir", "  "], "train.out_dir must name a folder for the run, got '  '"),
        (["--train.t_range", "[1, 2, 3]"], r"train.t_range must be \[t1, t2\] with 0 <= t1"),
        (["--train.t_range", "[-1, 5]"],
         r"train.t_range must be \[t1, t2\] with 0 <= t1 < t2, got \[-1, 5\]"),
        (["--sample.steps", "0"], r"sample.steps must be finite and > 0, got 0"),
        (["--sample.cfg_scale", "0.5"], r"sample.cfg_scale=0.5 needs a class-conditional"),
        (["--diffusion.learn_sigma", "true", "--sample.variance", "small"],
         "sample.variance='small' applies to a fixed variance"),
    ],
)  # fmt: skip
def test_more_bounds_are_refused_by_name(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("digits_adm", overrides)


def test_micro_batches_below_k_are_allowed_with_uniform_sampling():
    """Only stratified sampling draws at least k timesteps in each micro-batch."""
    cfg = load_config("digits_adm", ["--ant.sampling", "uniform", "--train.micro_batch", "2"])
    assert (cfg.train.micro_batch, cfg.ant.k) == (2, 5)


def test_a_t_range_takes_batches_and_micro_batches_below_k():
    """A train.t_range (an NTG specialist, vanilla) draws t uniformly in it, not by cluster:
    a batch or micro-batch below k was refused as if it were stratified."""
    base = ["--ant.method", "vanilla", "--train.t_range", "[0, 200]"]
    cfg = load_config("digits_adm", [*base, "--train.batch_size", "4", "--train.micro_batch", "2"])
    assert (cfg.train.batch_size, cfg.train.micro_batch, cfg.ant.k) == (4, 2, 5)
    assert load_config("digits_adm", [*base, "--train.batch_size", "3"]).train.batch_size == 3
    with pytest.raises(ValueError, match="train.micro_batch=2 is smaller than ant.k=5"):
        load_config("digits_adm", ["--ant.method", "vanilla", "--train.batch_size", "10",
                                   "--train.micro_batch", "2"])  # fmt: skip


def test_sections_built_directly_refuse_none_and_non_numbers_with_a_value_error():
    """A choice without None among its values and a bound refuse None (no TypeError from
    math.isfinite); cfg_scale refuses text."""
    with pytest.raises(ValueError, match=r"diffusion.schedule must be one of .*got None"):
        DiffusionConfig(schedule=None)
    with pytest.raises(ValueError, match=r"diffusion.min_snr_gamma must be finite and > 0, got No"):
        DiffusionConfig(min_snr_gamma=None)
    with pytest.raises(ValueError, match=r"sample.cfg_scale must be a finite number, got '3'"):
        SampleConfig(cfg_scale="3")


def test_method_kwargs_that_are_not_keywords_are_a_value_error(tmp_path):
    """make_method(**{1: 2}) is a TypeError: the config reports it as a ValueError."""
    path = tmp_path / "c.yaml"
    path.write_text("base: digits_adm\nant:\n  method_kwargs: {1: 2}\n")
    with pytest.raises(ValueError, match=r"ant.method / ant.method_kwargs: "):
        load_config(path)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [  # a union of more than text and None gives the union, not "quote it"
        (["--ant.min_size", "1.5"], r"^ant.min_size must be int \| str \| None, got 1.5$"),
        (["--ant.update_every", "abc"], r"^ant.update_every must be int \| None, got 'abc'$"),
        # a list where text was meant is not "YAML read a list: quote it"
        (["--train.out_dir", "[a]"], r"^train.out_dir must be str, got \['a'\]$"),
    ],
)
def test_coercion_errors_name_the_declared_type(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("digits_adm", overrides)


def test_list_elements_are_coerced_one_by_one():
    """YAML 1.1 reads 1e-1 as text: each element of a list[float] is coerced like a float."""
    cfg = load_config("digits_adm", ["--train.betas", "[1e-1, 0.99]"])
    assert cfg.train.betas == [0.1, 0.99] and all(type(b) is float for b in cfg.train.betas)
    with pytest.raises(ValueError, match=r"train.t_range must be list\[int\] \| None"):
        load_config("digits_adm", ["--train.t_range", "[0, '5']"])


def test_unknown_key_lists_the_sections_keys_sorted():
    with pytest.raises(ValueError) as e:
        load_config("digits_adm", ["--train.stepz", "3"])
    keys = sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert str(e.value).endswith(f"Valid keys of 'train': {keys}")


def test_documented_defaults():
    """The defaults the field comments and the digits presets rely on (digits_dit and
    digits_ldm set no grad_clip: they clip at 1)."""
    t = Config().train
    assert (t.ema_decay, t.grad_clip, t.micro_batch, t.sample_every) == (0.9999, 1.0, 0, 0)
    assert load_config("digits_dit").train.grad_clip == 1.0
    assert load_config("digits_ldm").train.grad_clip == 1.0


def test_available_presets_are_the_package_yaml_files_sorted():
    folder = Path(antdiff.__file__).parent / "presets"
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    assert len(names) >= 8 and available_presets() == names


def test_dump_config_keeps_the_field_order_and_round_trips():
    cfg = load_config("digits_dit", ["--ant.method", "nash"])
    text = dump_config(cfg)
    assert list(yaml.safe_load(text)) == [f.name for f in dataclasses.fields(Config)]
    assert text.startswith("name: digits_dit\ndata:\n  source: digits\n")
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_resume_may_change_every_free_key_and_nothing_else():
    a = load_config("digits_adm").to_dict()
    free = ["--name", "other", "--train.steps", "9", "--train.log_every", "3",
            "--train.sample_every", "7", "--train.ckpt_every", "11", "--train.keep_ckpts", "5",
            "--train.out_dir", "elsewhere", "--train.num_workers", "2",
            "--train.progress", "false", "--sample.n", "4", "--sample.steps", "20"]  # fmt: skip
    b = load_config("digits_adm", free).to_dict()
    assert len(RESUME_FREE) == 10 and resume_conflicts(a, b) == []
    c = load_config("digits_adm", [*free, "--train.threads", "1", "--train.seed", "3"]).to_dict()
    assert resume_conflicts(a, c) == ["train.seed", "train.threads"]


def test_an_empty_yaml_file_is_the_defaults_under_its_name(tmp_path):
    (tmp_path / "blank.yaml").write_text("")
    cfg = load_config(tmp_path / "blank.yaml")
    assert cfg == dataclasses.replace(Config(), name="blank")


def test_a_yml_base_is_found_next_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "under.yml").write_text("base: digits_adm\ntrain:\n  steps: 4\n")
    (tmp_path / "top.yaml").write_text("base: sub/under.yml\ntrain:\n  lr: 0.5\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert (cfg.name, cfg.train.steps, cfg.train.lr) == ("top", 4, 0.5)


def test_merge_returns_a_copy_and_leaves_its_inputs_alone():
    base = {"train": {"steps": 1, "lr": 0.1}, "name": "a"}
    top = {"train": {"steps": 2}, "ant": {"k": 3}}
    out = _merge(base, top)
    assert out == {"train": {"steps": 2, "lr": 0.1}, "name": "a", "ant": {"k": 3}}
    assert base == {"train": {"steps": 1, "lr": 0.1}, "name": "a"}
    assert top == {"train": {"steps": 2}, "ant": {"k": 3}}


def test_upgrade_keeps_what_the_run_read_without_a_warning():
    """Nothing to drop: the same dict back, and no warning (a latent run without image_size,
    a class-conditional run's num_classes)."""
    saved = {"data": {"source": "latents", "path": "z.pt", "image_size": None,
                      "random_flip": False},
             "ant": {"clustering": "gradient", "affinity": "a.npy"}}  # fmt: skip
    cond = {"data": {"class_conditional": True, "num_classes": 10, "random_flip": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert upgrade_saved_config(saved) is saved
        assert upgrade_saved_config(cond) is cond


def test_upgrade_drops_a_scale_below_one_and_a_path_without_a_source():
    """The saved source defaults to digits; latent_scale 0.5 is as unread as 2; a section the
    checkpoint lacks stays absent."""
    with pytest.warns(UserWarning, match=r"data.path='/x', data.latent_scale=0.5"):
        new = upgrade_saved_config({"data": {"path": "/x", "latent_scale": 0.5}})
    assert new == {"data": {"path": None, "latent_scale": 1.0, "random_flip": False}}


def test_peak_allocated_on_cuda_is_the_peak_of_the_calls_above_the_level_after_build(monkeypatch):
    """The CUDA branch with a counting stand-in for the caching allocator: build's own peak
    (a temporary it frees) and the blocks it keeps do not count; each call is made."""
    mem = {"now": 0, "peak": 0}

    def alloc(n):
        mem["now"] += n
        mem["peak"] = max(mem["peak"], mem["now"])

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: mem["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device=None: mem.update(peak=mem["now"])
    )
    calls = []

    def build():
        alloc(5 * MB)  # kept: the model
        alloc(9 * MB)  # a temporary of the set-up, freed before the work runs
        alloc(-9 * MB)

        def work():
            calls.append(1)
            alloc(len(calls) * MB)
            alloc(-len(calls) * MB)

        return work

    assert peak_allocated(build, device="cuda", repeat=3) == 3 * MB and len(calls) == 3


@pytest.mark.parametrize("section", ["false", "3", "[1]"])
def test_a_section_that_is_not_a_mapping_is_refused_also_under_an_override(tmp_path, section):
    """Without an override ``train: false`` is refused (test_config); with ``--train.steps 5``
    it loaded, and ``train: 3`` raised a TypeError (a traceback from the CLI)."""
    (tmp_path / "f.yaml").write_text(f"base: digits_adm\ntrain: {section}\n")
    with pytest.raises(ValueError, match="train must be a mapping"):
        load_config(tmp_path / "f.yaml", ["--train.steps", "5"])


@pytest.mark.parametrize(
    ("key", "match"),
    [("train.seed", r"train.seed must be below 2\*\*63"), ("train.lr", "train.lr must be")],
)
def test_an_integer_too_large_for_a_float_is_a_value_error(key, match):
    with pytest.raises(ValueError, match=match):
        load_config("digits_adm", [f"--{key}", "9" * 400])


def test_work_that_allocates_nothing_peaks_at_zero():
    assert peak_allocated(lambda: lambda: None) == 0
    kept = []
    assert peak_allocated(lambda: (kept.append(torch.empty(MB, dtype=torch.uint8)), int)[1]) == 0


def test_the_level_before_the_run_is_the_last_one_build_left():
    """build keeps two blocks (1 MB, then 4 MB): the run's 2 MB counts above both."""

    def build():
        kept = [torch.empty(MB, dtype=torch.uint8)]
        kept.append(torch.empty(4 * MB, dtype=torch.uint8))

        def run():
            x = torch.empty(2 * MB, dtype=torch.uint8)
            del x
            return kept

        return run

    assert peak_allocated(build, repeat=1) == 2 * MB


def test_the_default_repeat_calls_the_work_twice():
    calls = []
    peak_allocated(lambda: lambda: calls.append(1))
    assert len(calls) == 2


def test_a_run_the_profiler_did_not_mark_is_named(monkeypatch):
    import contextlib

    import torch.profiler

    monkeypatch.setattr(torch.profiler, "record_function", lambda name: contextlib.nullcontext())
    with pytest.raises(RuntimeError, match="the profiler recorded no marker event"):
        peak_allocated(lambda: lambda: None)


def test_a_saved_config_that_is_not_a_mapping_is_a_value_error():
    from antdiff.config import config_from_saved

    assert upgrade_saved_config(None) is None
    with pytest.raises(ValueError, match=r"config section top level must be a mapping, got \[1\]"):
        config_from_saved([1])


def test_a_nested_override_under_a_value_names_that_value():
    with pytest.raises(ValueError, match=r"^model.overrides.dropout is 0.1, not a mapping; cannot"):
        load_config("digits_adm", ["--model.overrides.dropout", "0.1",
                                   "--model.overrides.dropout.x", "1"])  # fmt: skip


def test_load_config_takes_the_last_of_a_repeated_override():
    """Only a user's command line (parse_overrides(once=True), in the CLI) refuses a repeat."""
    assert load_config("digits_adm", ["--train.steps", "3", "--train.steps", "4"]).train.steps == 4


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["--ant.min_size", "0"], r"ant.min_size must be a positive number of timesteps, got 0"),
        (["--ant.max_size", "-3"], r"ant.max_size must be a positive number of timesteps, got -3"),
        (["--ant.min_size", "300", "--ant.max_size", "100"],
         r"ant.min_size=300 exceeds ant.max_size=100"),  # fmt: skip
    ],
)
def test_cluster_size_limits_are_checked_with_the_config(overrides, match):
    """They were accepted here and refused only once the run was built, as ``min_size``."""
    with pytest.raises(ValueError, match=match):
        load_config("digits_adm", overrides)
    assert load_config("digits_adm", ["--ant.min_size", "100", "--ant.max_size", "100"])
