"""Config: presets, dotted overrides, validation messages, resume comparisons."""

from __future__ import annotations

from pathlib import Path

import pytest

from antdiff.cli import main as cli_main
from antdiff.config import (
    Config,
    available_presets,
    config_from_dict,
    load_config,
    parse_overrides,
    resume_conflicts,
)

PAPER = ("adm_light_ffhq256", "ldm_ffhq256", "dit_s2_imagenet256", "dit_l2_imagenet256")


def test_every_preset_loads_and_validates():
    names = available_presets()
    assert set(PAPER) <= set(names)
    assert {"digits_adm", "digits_ldm", "digits_dit", "digits_adm_uw_pcgrad"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, Config) and cfg.name == name


@pytest.mark.parametrize(
    "name, model, batch, steps, schedule, sampler, learn_sigma",
    [  # the paper's Appendix E
        ("adm_light_ffhq256", "adm-light", 8, 1_000_000, "linear", "ddim", True),
        ("ldm_ffhq256", "ldm-ffhq", 30, 400_000, "scaled_linear", "ddim", False),
        ("dit_s2_imagenet256", "DiT-S/2", 50, 800_000, "cosine", "ddpm", True),
        ("dit_l2_imagenet256", "DiT-L/2", 256, 400_000, "cosine", "ddpm", True),
    ],
)
def test_paper_presets_hold_the_paper_settings(
    name, model, batch, steps, schedule, sampler, learn_sigma
):
    cfg = load_config(name)
    assert cfg.model.name == model and cfg.model.overrides == {}
    assert (cfg.train.batch_size, cfg.train.steps, cfg.train.lr) == (batch, steps, 1e-4)
    assert (cfg.diffusion.schedule, cfg.diffusion.T) == (schedule, 1000)
    assert cfg.diffusion.learn_sigma is learn_sigma
    assert cfg.ant.k == 5 and cfg.sample.sampler == sampler
    assert cfg.train.grad_clip is None  # the paper and the code it builds on do not clip
    if name.startswith("dit"):
        assert cfg.data.class_conditional and cfg.data.num_classes == 1000
        assert cfg.sample.steps == 250
    if name == "dit_l2_imagenet256":
        assert cfg.sample.cfg_scale == 1.5


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        "digits_adm",
        [
            "--ant.method", "nash",
            "--train.lr", "1e-3",  # YAML 1.1 reads this as a string: coerced to float
            "--train.betas", "[0.8, 0.95]",
            "--train.steps=7",
            "--ant.update_every", "null",
            "--ant.max_size", "none",
            "--model.overrides.dropout", "0.1",
            "--ant.method_kwargs.update_every", "3",
            "--train.grad_clip", "2",
        ],
    )  # fmt: skip
    assert cfg.ant.method == "nash" and cfg.train.lr == 1e-3 and cfg.train.steps == 7
    assert cfg.train.betas == [0.8, 0.95] and cfg.train.grad_clip == 2.0
    assert cfg.ant.update_every is None and cfg.ant.max_size is None
    assert cfg.model.overrides == {"dropout": 0.1}
    assert cfg.ant.method_kwargs == {"update_every": 3}


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c.d=x y", "--e.f", "[1, 2]"]) == [
        ("a.b", 1),
        ("c.d", "x y"),
        ("e.f", [1, 2]),
    ]
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--a.b", "--c.d", "1"])
    with pytest.raises(ValueError, match="expected a --section.key"):
        parse_overrides(["a.b", "1"])


def test_unknown_key_names_it_lists_valid_keys_and_suggests():
    with pytest.raises(ValueError) as e:
        load_config("digits_adm", ["--train.batchsize", "3"])
    msg = str(e.value)
    assert "'train.batchsize'" in msg and "'batch_size'" in msg and "Did you mean" in msg
    assert "ema_decay" in msg  # the section's valid keys are listed
    with pytest.raises(ValueError, match="unknown config key 'trian'.*'train'"):
        load_config("digits_adm", ["--trian.steps", "3"])


def test_unknown_key_in_a_yaml_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("ant:\n  methdo: uw\n")
    with pytest.raises(ValueError, match="'ant.methdo'.*Did you mean 'ant.method'"):
        load_config(p)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError) as e:
        load_config("digits_admm")
    msg = str(e.value)
    assert "unknown preset 'digits_admm'" in msg and "Did you mean 'digits_adm'" in msg
    for name in PAPER:
        assert name in msg


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--ant.method", "pcgard"], "unknown MTL method 'pcgard'"),
        (["--train.batch_size", "3"], "batch_size=3 is smaller than ant.k=5"),
        (["--data.source", "web"], r"data.source must be one of \['digits'"),
        (["--data.source", "folder"], "data.path is required"),
        (["--train.ema_decay", "1.0"], "ema_decay must be in"),
        (["--train.steps", "0"], "train.steps must be finite and > 0"),
        (["--train.grad_clip", ".nan"], "train.grad_clip must be finite and >= 0, got nan"),
        (["--train.lr", ".inf"], "train.lr must be finite and > 0, got inf"),
        (["--train.weight_decay", ".nan"], "train.weight_decay must be finite"),
        (["--data.latent_scale", ".nan"], "data.latent_scale must be finite"),
        (["--data.latent_shift", "0.5"], "applies to stored latents"),
        (["--data.source", "latents", "--data.path", "z.pt", "--data.latent_shift", ".nan"],
         "data.latent_shift must be a finite number"),
        (["--diffusion.p2_gamma", ".nan"], "diffusion.p2_gamma must be finite and >= 0"),
        (["--diffusion.p2_k", "-1"], "diffusion.p2_k must be finite and >= 0, got -1"),
        (["--diffusion.min_snr_gamma", ".nan"], "diffusion.min_snr_gamma must be finite"),
        (["--train.steps", "ten"], "train.steps must be int, got 'ten'"),
        (["--model.name", "adm-tinny"], "did you mean 'adm-tiny'"),
        (["--ant.clustering", "gradient"], "needs ant.affinity"),
        (["--ant.clustering", "snrr"], r"or a clusters .json file \(antdiff cluster --json"),
        (["--diffusion.prediction", "noise"], "diffusion.prediction must be one of"),
        (["--train.device", "tpu"], "train.device must be"),
        (["--sample.steps", "2000"], "exceeds diffusion.T"),
        (["--ant.update_every", "5"], "update_every applies to gradient methods"),
        (["--ant.method", "graddrop", "--ant.update_every", "5"], "keeps no weights to reuse"),
        (["--train.seed", str(2**64)], "train.seed must be below 2"),
        (["--sample.cfg_scale", "3"], "needs a class-conditional model"),
        (["--sample.cfg_scale", ".nan"], "sample.cfg_scale must be a finite number, got nan"),
        (["--train.out_dir", "''"], "train.out_dir must name a folder"),
    ],
)
def test_validation_messages(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("digits_adm", overrides)


def test_uniform_sampling_allows_batches_below_k():
    cfg = load_config("digits_adm", ["--train.batch_size", "3", "--ant.sampling", "uniform"])
    assert cfg.train.batch_size == 3


def test_round_trip_through_dict():
    cfg = load_config("digits_dit", ["--ant.method", "uw+pcgrad"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_resume_conflicts_ignore_steps_and_logging_only():
    a = load_config("digits_adm").to_dict()
    b = load_config(
        "digits_adm",
        ["--train.steps", "9", "--train.log_every", "3", "--sample.n", "4", "--train.lr", "1e-3"],
    ).to_dict()
    assert resume_conflicts(a, b) == ["train.lr"]
    c = load_config("digits_adm", ["--ant.method", "nash", "--model.overrides.dropout", "0.1"])
    assert resume_conflicts(a, c.to_dict()) == ["ant.method", "model.overrides.dropout"]


def test_cli_print_config_and_errors(capsys):
    assert cli_main(["train", "--config", "digits_adm", "--ant.k", "3", "--print-config"]) == 0
    assert "k: 3" in capsys.readouterr().out
    assert cli_main(["train", "--config", "digits_adm", "--ant.kk", "3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'ant.kk'" in err
    assert cli_main(["train", "--config", "nope"]) == 2
    assert "Available presets" in capsys.readouterr().err


def test_model_overrides_of_the_wrong_kind_are_refused_before_any_data_loads():
    """A mistyped override raised a TypeError from inside torch, after the data loaded; now
    the config refuses it and names the key and the kind its default has."""
    for value, shown in (("abc", "'abc'"), ("12.5", "12.5")):
        with pytest.raises(ValueError, match=f"model_channels={shown} .*default 32 .an integer"):
            load_config("digits_adm", ["--model.overrides.model_channels", value])
    with pytest.raises(ValueError, match="use_scale_shift_norm=1 .*true or false"):
        load_config("digits_adm", ["--model.overrides.use_scale_shift_norm", "1"])
    cfg = load_config("digits_adm", ["--model.overrides.channel_mult", "[1, 2]"])
    assert cfg.model.overrides["channel_mult"] == [1, 2]
    from antdiff.models import model_config

    cfg = load_config("digits_adm", ["--model.overrides.dropout", "1e-1"])  # YAML: text
    assert model_config("adm-tiny", **cfg.model.overrides)["dropout"] == 0.1
    from antdiff.models import create_model

    with pytest.raises(ValueError, match=r"channel_mult must list one positive width multiplier "
                       r"per level, e.g. \[1, 2, 2\], got 5 \(--model.overrides.channel_mult\)"):
        create_model("adm-tiny", channel_mult=5)  # one value, not a list


def test_a_nested_override_into_an_empty_yaml_mapping(tmp_path):
    """``method_kwargs:`` with nothing under it reads as null: an override below it fills it."""
    path = tmp_path / "c.yaml"
    path.write_text("ant:\n  method: uw\n  method_kwargs:\n")
    cfg = load_config(str(path), ["--ant.method_kwargs.lr", "0.1"])
    assert cfg.ant.method_kwargs == {"lr": 0.1}


def test_text_keys_given_a_date_or_number_say_how_to_quote_it():
    """YAML reads 2024-01-01 as a date and 123 as a number: a text key says to quote it."""
    with pytest.raises(ValueError, match="train.out_dir must be text.*a date.: quote it"):
        load_config("digits_adm", ["--train.out_dir", "2024-01-01"])
    with pytest.raises(ValueError, match="data.path must be text, got 123 .YAML read a int"):
        load_config("digits_adm", ["--data.path", "123"])
    assert load_config("digits_adm", ["--train.out_dir", "'2024-01-01'"]).train.out_dir == (
        "2024-01-01"
    )


def test_bad_yaml_and_duplicate_keys_are_named(tmp_path):
    """A config file or override that does not parse is a ValueError naming it (it was a
    yaml traceback); a key given twice is refused (YAML kept the last silently, dropping
    train.steps below)."""
    from antdiff.config import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    with pytest.raises(ValueError, match=r"config '.*bad.yaml' is not valid YAML"):
        load_config(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  steps: 5\ntrain:\n  lr: 1.0\n")
    with pytest.raises(ValueError, match="key 'train' is given twice"):
        load_config(dup)
    with pytest.raises(ValueError, match=r"the value of --train.betas \('\[0.9,'\) is not valid"):
        load_config("digits_adm", ["--train.betas", "[0.9,"])
    assert load_config("digits_adm", ["--train.betas", "[0.9, 0.99]"]).train.betas == [0.9, 0.99]
    merged = tmp_path / "merge.yaml"  # anchors and merge keys stay valid, overrides included
    merged.write_text("base: &b {steps: 5, lr: 0.5}\ntrain:\n  <<: *b\n  lr: 0.25\n"
                      "model: {name: adm-tiny}\n")
    from antdiff.config import load_yaml

    assert load_yaml(merged.read_text(), "m")["train"] == {"steps": 5, "lr": 0.25}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["--data.path", "/data/imgs"], r"data.path='/data/imgs' is not read by data.source="
                                        r"'digits'.*--data.source folder"),
        (["--data.latent_scale", "3"], r"data.latent_scale=3.0 applies to stored latents"),
        (["--data.num_classes", "5"], "add --data.class_conditional true"),
        (["--ant.affinity", "foo.npy"], "read only by ant.clustering='gradient'"),
    ],
)
def test_settings_the_run_would_ignore_are_refused(overrides, match):
    """Each trained on digits without a word (data.path without data.source folder trained on
    the built-in set); each now names the setting that would read it."""
    from antdiff.config import load_config

    with pytest.raises(ValueError, match=match):
        load_config("digits_adm", overrides)


def test_the_method_is_kept_in_the_registrys_spelling():
    """Names ignore case and spaces around "+"; the config keeps the registry's spelling, which
    the trainer and the CLI compare with ("vanilla": a 'Vanilla' run took the ANT paths)."""
    for given, kept in (("Vanilla", "vanilla"), ("UW + PCGrad", "uw+pcgrad"), ("NASH", "nash")):
        assert load_config("digits_adm", ["--ant.method", given]).ant.method == kept


def test_a_yaml_file_builds_on_a_base(tmp_path):
    """``base:`` names a preset or another YAML file (relative to this one); this file's keys
    are laid over it section by section, and the config takes this file's name."""
    preset = load_config("digits_dit")
    (tmp_path / "mine.yaml").write_text(
        "base: digits_dit\ntrain:\n  steps: 7\nant:\n  method: pcgrad\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.yaml").write_text("base: ../mine.yaml\ntrain:\n  lr: 0.5\n")
    c = load_config(tmp_path / "sub" / "more.yaml", ["--train.batch_size", "12"])
    assert (c.name, c.train.steps, c.ant.method, c.train.lr, c.train.batch_size) == (
        "more", 7, "pcgrad", 0.5, 12
    )
    # everything else is the preset's (a section's other keys too)
    assert c.model == preset.model and c.train.log_every == preset.train.log_every
    assert c.ant.k == preset.ant.k and c.data == preset.data
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="bases form a cycle"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text("base: 3\n")
    with pytest.raises(ValueError, match="base must name a preset or a YAML file"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("base: digits_ditt\n")
    with pytest.raises(ValueError, match="Did you mean 'digits_dit'"):
        load_config(tmp_path / "typo.yaml")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [  # each bound and check, at the value just past it (one validation each)
        (["--data.source", "latents"], r"data.path is required for data.source='latents'"),
        (["--data.image_size", "0"], r"data.image_size must be finite and > 0, got 0"),
        (["--data.channels", "2"], r"data.channels must be one of \[1, 3\], got 2"),
        (["--data.autoencoder", "tiny", "--data.random_flip", "true"],
         "the tiny autoencoder encodes each image once, unflipped; set --data.random_flip false"),
        (["--data.source", "latents", "--data.path", "z.pt", "--data.autoencoder", "tiny"],
         "data.autoencoder encodes images; data.source='latents' has none"),
        (["--data.autoencoder_steps", "0"], r"data.autoencoder_steps must be finite and > 0"),
        (["--diffusion.T", "0"], r"diffusion.T must be finite and > 0, got 0"),
        (["--diffusion.loss_weighting", "snr"], r"diffusion.loss_weighting must be one of"),
        (["--ant.method", "nash", "--ant.update_every", "0"],
         r"ant.update_every must be finite and > 0, got 0"),
        (["--ant.min_size", "big"], r"ant.min_size must be an int, null or 'default', got 'big'"),
        (["--ant.max_size", "auto"], r"ant.max_size must be an int, null or 'default'"),
        (["--ant.method", "graddrop", "--ant.update_every", "2"], "keeps no weights to reuse"),
        (["--train.keep_ckpts", "0"], r"train.keep_ckpts must be finite and > 0, got 0"),
        (["--train.threads", "-1"], r"train.threads must be finite and >= 0, got -1"),
        (["--train.micro_batch", "-8"], r"train.micro_batch must be finite and >= 0"),
        (["--train.micro_batch", "24"], r"micro_batch=24 does not divide train.batch_size=64"),
        (["--train.micro_batch", "4"], r"train.micro_batch=4 is smaller than ant.k=5"),
        (["--train.betas", "[0.9, 1.0]"], r"train.betas must be two numbers in \[0, 1\)"),
        (["--train.betas", "[0.9, 0.99, 0.5]"], r"train.betas must be two numbers in \[0, 1\)"),
        (["--train.betas", "[-0.1, 0.9]"], r"train.betas must be two numbers in \[0, 1\)"),
        (["--train.ema_decay", "-0.5"], r"train.ema_decay must be in \[0, 1\), got -0.5"),
        (["--train.device", "cudax"], "train.device must be auto, cpu, cuda or cuda:N"),
        (["--train.seed", str(2**63)], r"train.seed must be below 2\*\*63"),
        (["--train.seed", "-1"], r"train.seed must be finite and >= 0, got -1"),
        (["--train.t_range", "[5, 5]"], r"train.t_range must be \[t1, t2\] with 0 <= t1 < t2"),
        (["--train.t_range", "[0, 1001]"], r"t_range=\[0, 1001\] must satisfy .*diffusion.T=1000"),
        (["--train.batch_size", "4"], "batch_size=4 is smaller than ant.k=5"),
        (["--diffusion.learn_sigma", "true", "--sample.variance", "large"],
         "applies to a fixed variance.*leave sample.variance unset"),
        (["--sample.steps", "1001"], "sample.steps=1001 exceeds diffusion.T=1000"),
        (["--sample.variance", "huge"],
         r"sample.variance must be one of \[None, 'small', 'large'\], got 'huge'"),
        (["--sample.cfg_channels", "0"], r"sample.cfg_channels must be finite and > 0, got 0"),
        (["--sample.n", "0"], r"sample.n must be finite and > 0, got 0"),
        (["--train.steps", "true"], "train.steps must be int, got True"),
        (["--train.lr", "true"], "train.lr must be float, got True"),
        (["--train.out_dir", ""], "train.out_dir must name a folder"),
        (["--train", "3"], r"override --train names a section; use --train.<key>"),
        (["--name.x", "3"], r"config key 'name' has no sub-keys \(got 'name.x'\)"),
        (["--train.lr.x", "3"], r"train.lr is not a mapping; cannot set 'train.lr.x'"),
    ],
)  # fmt: skip
def test_each_bound_is_refused_just_past_it(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("digits_adm", overrides)


@pytest.mark.parametrize(
    ("overrides", "key", "value"),
    [  # each bound's edge that is still valid
        (["--train.batch_size", "5"], "train.batch_size", 5),
        (["--train.batch_size", "60", "--train.micro_batch", "5"], "train.micro_batch", 5),
        (["--train.ema_decay", "0"], "train.ema_decay", 0.0),
        (["--train.betas", "[0, 0.5]"], "train.betas", [0.0, 0.5]),
        (["--train.seed", str(2**63 - 1)], "train.seed", 2**63 - 1),
        (["--train.device", "cuda:1"], "train.device", "cuda:1"),
        (["--train.t_range", "[0, 1000]"], "train.t_range", [0, 1000]),
        (["--train.t_range", "[999, 1000]"], "train.t_range", [999, 1000]),
        (["--sample.steps", "1000"], "sample.steps", 1000),
        (["--ant.clustering", "my_clusters.JSON"], "ant.clustering", "my_clusters.JSON"),
        (["--ant.method", "graddrop", "--ant.update_every", "1"], "ant.update_every", 1),
        (["--ant.method", "nash", "--ant.update_every", "4"], "ant.update_every", 4),
        (["--diffusion.loss_weighting", "min_snr"], "diffusion.loss_weighting", "min_snr"),
        (["--ant.min_size", "3", "--ant.max_size", "null"], "ant.min_size", 3),
        (["--data.autoencoder", "tiny", "--data.random_flip", "false"], "data.flips", False),
    ],
)  # fmt: skip
def test_each_bound_keeps_its_valid_edge(overrides, key, value, tmp_path, monkeypatch):
    section, name = key.split(".")
    if key == "ant.clustering":  # a clusters file given as an override is read with the config
        from antdiff.clustering import Clusters

        monkeypatch.chdir(tmp_path)
        Path(value).write_text(Clusters((0, 200, 400, 600, 800, 1000), "custom").to_json())
    got = getattr(getattr(load_config("digits_adm", overrides), section), name)
    assert got == value and type(got) is type(value)


def test_flips_default_by_source_and_the_explicit_setting_wins():
    from antdiff.config import DataConfig

    assert DataConfig().flips is False  # digits are not mirror-symmetric
    assert DataConfig(source="folder", path="imgs").flips is True
    assert DataConfig(source="folder", path="imgs", autoencoder="tiny").flips is False
    assert DataConfig(source="latents", path="z.pt").flips is False
    assert DataConfig(source="folder", path="imgs", random_flip=False).flips is False
    assert DataConfig(random_flip=True).flips is True


def test_latent_shift_refuses_a_bool():
    from antdiff.config import DataConfig

    with pytest.raises(ValueError, match="data.latent_shift must be a finite number, got True"):
        DataConfig(source="latents", path="z.pt", latent_shift=True)
    assert DataConfig(source="latents", path="z.pt", latent_shift=-0.5).latent_shift == -0.5


def test_ddpm_variance_follows_the_sampler_asked_for():
    from antdiff.config import SampleConfig

    ddim = SampleConfig(sampler="ddim", variance="large")
    assert ddim.ddpm_variance() is None and ddim.ddpm_variance("ddpm") == "large"
    ddpm = SampleConfig(sampler="ddpm", variance="large")
    assert ddpm.ddpm_variance() == "large" and ddpm.ddpm_variance("ddim") is None


def test_the_config_copies_the_mappings_it_is_given():
    overrides, kwargs = {"dropout": 0.1}, {"lr": 0.1}
    cfg = config_from_dict({"model": {"overrides": overrides}, "ant": {"method_kwargs": kwargs}})
    overrides["dropout"], kwargs["lr"] = 0.5, 0.9
    assert cfg.model.overrides == {"dropout": 0.1} and cfg.ant.method_kwargs == {"lr": 0.1}


def test_an_empty_yaml_section_keeps_its_defaults_and_takes_overrides(tmp_path):
    """``ant:`` with nothing under it reads as null: the section keeps its defaults, and an
    override into it fills it."""
    path = tmp_path / "c.yaml"
    path.write_text("ant:\ntrain:\n  steps: 3\n")
    cfg = load_config(path)
    assert cfg.ant == Config().ant and cfg.train.steps == 3
    assert load_config(path, ["--ant.k", "3"]).ant.k == 3


def test_bases_that_never_repeat_a_spelling_still_stop(tmp_path):
    """``base: ../d/a.yaml`` inside d/ names the file itself under a longer path each time:
    files are compared by where they are, so it is the cycle error, not a RecursionError."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.yaml").write_text("base: ../d/a.yaml\n")
    with pytest.raises(ValueError, match="bases form a cycle"):
        load_config(tmp_path / "d" / "a.yaml")


def test_a_long_chain_of_bases_is_not_called_a_cycle(tmp_path):
    """Ten files, each on the next and the last on a preset, load (the depth check used to
    report them as a cycle); past 16 the message says how deep they go, not a cycle."""
    for i in range(1, 11):
        nxt = f"c{i + 1}.yaml" if i < 10 else "digits_adm"
        (tmp_path / f"c{i}.yaml").write_text(f"base: {nxt}\ntrain:\n  seed: {i}\n")
    assert load_config(tmp_path / "c1.yaml").train.seed == 1
    for i in range(1, 19):
        (tmp_path / f"e{i}.yaml").write_text(f"base: e{i + 1}.yaml\n" if i < 18 else "{}\n")
    with pytest.raises(ValueError, match=r"bases go more than 16 deep .*merge some of them"):
        load_config(tmp_path / "e1.yaml")


@pytest.mark.parametrize("section", ["train: false\n", "ant: []\n", "train: 0\n"])
def test_a_section_that_is_not_a_mapping_is_refused_even_when_falsy(tmp_path, section):
    """false, [] or 0 in place of a section were taken as an empty one (its defaults kept)."""
    (tmp_path / "f.yaml").write_text(section)
    with pytest.raises(ValueError, match=r"config section (train|ant) must be a mapping"):
        load_config(tmp_path / "f.yaml")


def test_empty_sections_and_mappings_in_yaml_keep_their_defaults(tmp_path):
    """``train:`` and ``method_kwargs:`` with nothing under them are empty, not errors
    (method_kwargs failed with "must be dict, got None" unless an override filled it)."""
    (tmp_path / "f.yaml").write_text("train:\nant:\n  method_kwargs:\n")
    cfg = load_config(tmp_path / "f.yaml")
    assert cfg.ant.method_kwargs == {} and cfg.train.steps == Config().train.steps


def test_parse_overrides_once_refuses_a_repeated_key():
    assert parse_overrides(["--a.b", "1", "--a.b", "2"]) == [("a.b", 1), ("a.b", 2)]
    with pytest.raises(ValueError, match=r"--a.b is given twice \('1', then '2'\); give it once"):
        parse_overrides(["--a.b", "1", "--a.b=2"], once=True)
    assert parse_overrides(["--a.b", "", "--c.d", "  "]) == [("a.b", ""), ("c.d", "  ")]


def test_upgrade_saved_config_drops_unread_settings_with_a_warning():
    from antdiff.config import config_from_saved, upgrade_saved_config

    old = {"data": {"source": "digits", "latent_scale": 2.0},
           "ant": {"clustering": "snr", "affinity": "a.npy"}}  # fmt: skip
    with pytest.warns(UserWarning, match=r"data.latent_scale=2.0, ant.affinity='a.npy'"):
        new = upgrade_saved_config(old)
    assert new["data"] == {"source": "digits", "latent_scale": 1.0, "random_flip": False}
    assert new["ant"] == {"clustering": "snr", "affinity": None}
    assert old["data"]["latent_scale"] == 2.0  # a copy
    cfg = config_from_saved({"data": {"source": "folder", "path": "imgs"}})
    assert cfg.data.random_flip is False and cfg.data.flips is False  # it never flipped
    current = {"data": {"random_flip": True}}
    assert upgrade_saved_config(current) is current


def test_more_settings_the_run_cannot_use_are_refused(tmp_path):
    with pytest.raises(ValueError, match="keep the size they were saved at: drop it"):
        load_config("digits_adm", ["--data.source", "latents", "--data.path", "z.pt",
                                   "--data.image_size", "32"])  # fmt: skip
    with pytest.raises(ValueError, match=r"data.num_classes must be finite and > 0, got 0"):
        load_config("digits_adm", ["--data.class_conditional", "true", "--data.num_classes", "0"])
    from antdiff.config import ModelConfig

    with pytest.raises(ValueError, match=r"model.overrides must be a mapping, got \[1\]"):
        ModelConfig(overrides=[1])
    (tmp_path / "empty_base.yaml").write_text("base: ''\n")
    with pytest.raises(ValueError, match="base must name a preset or a YAML file, got ''"):
        load_config(tmp_path / "empty_base.yaml")
    (tmp_path / "list.yaml").write_text("- train\n- ant\n")
    with pytest.raises(ValueError, match=r"config '.*list.yaml' must hold a YAML mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="expected a --section.key override, got '--'"):
        parse_overrides(["--", "1"])


def test_a_yml_file_is_a_file_not_a_preset(tmp_path):
    (tmp_path / "mine.yml").write_text("base: digits_adm\ntrain:\n  steps: 3\n")
    cfg = load_config(tmp_path / "mine.yml")
    assert (cfg.name, cfg.train.steps) == ("mine", 3)
    with pytest.raises(FileNotFoundError, match="config file '.*gone.yml' does not exist"):
        load_config(tmp_path / "gone.yml")


def test_config_diff_tells_a_null_from_a_missing_key():
    from antdiff.config import config_diff

    assert config_diff({"a": {"b": None}}, {"a": {}}) == ["a.b"]
    assert config_diff({"a": {"b": None}}, {"a": {"b": None}}) == []


@pytest.mark.parametrize(
    ("data", "dropped", "key"),
    [
        ({"source": "latents", "path": "z.pt", "image_size": 32}, "data.image_size=32",
         "image_size"),
        ({"source": "digits", "path": "/x"}, "data.path='/x'", "path"),
        ({"source": "digits", "num_classes": 10}, "data.num_classes=10", "num_classes"),
    ],
)  # fmt: skip
def test_upgrade_saved_config_drops_each_unread_data_key(data, dropped, key):
    from antdiff.config import config_from_saved, upgrade_saved_config

    with pytest.warns(UserWarning, match=f"sets {dropped}, which the run did not read"):
        new = upgrade_saved_config({"data": data})
    assert new["data"][key] is None and data[key] is not None
    with pytest.warns(UserWarning, match=dropped):
        assert getattr(config_from_saved({"data": data}).data, key) is None
