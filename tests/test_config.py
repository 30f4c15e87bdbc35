"""Typed config: presets, validation, unknown-key suggestions, overrides, resolved output."""

from __future__ import annotations

import dataclasses

import pytest

from valle_cli.config import Config, dump_config, load_config, parse_override, preset_names
from valle_cli.errors import ConfigError


def test_presets_exist_and_validate():
    assert {"tiny", "small", "base"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert isinstance(cfg, Config)


def test_base_preset_is_the_original_shape():
    m = load_config("base").model
    assert (m.d_model, m.n_layers, m.n_heads, m.ffn_dim, m.n_levels) == (1024, 12, 16, 4096, 8)
    assert load_config("base").codec.name == "encodec"
    assert load_config("base").codec.bandwidth == 6.0


def test_tiny_and_small_presets_are_small_and_offline():
    tiny, small = load_config("tiny"), load_config("small")
    assert tiny.model.d_model * tiny.model.n_layers < small.model.d_model * small.model.n_layers
    assert small.model.d_model * small.model.n_layers < 1024 * 12
    assert tiny.codec.name == small.codec.name == "mel"  # runnable with no downloads


def test_defaults_without_source():
    cfg = load_config(None)
    assert cfg.model.d_model == 1024 and cfg.train.backend == "local"


@pytest.mark.parametrize(
    "yaml_text, message, hint",
    [
        ("model:\n  d_modle: 32\n", "unknown config key 'model.d_modle'", "did you mean 'model.d_model'"),
        ("trian:\n  lr: 0.1\n", "unknown config key 'trian'", "did you mean 'train'"),
        ("model:\n  lr: 0.1\n", "unknown config key 'model.lr'", "did you mean 'train.lr'"),
        (
            "train:\n  lora:\n    rnak: 8\n",
            "unknown config key 'train.lora.rnak'",
            "did you mean 'train.lora.rank'",
        ),
        ("train:\n  backend: deepspead\n", "train.backend must be one of", "did you mean 'deepspeed'"),
        ("model:\n  n_layers: many\n", "model.n_layers must be an integer", None),
        ("model:\n  d_model: 100\n  n_heads: 16\n", "not divisible", None),
        ("train:\n  lr: -1\n", "train.lr must be positive", None),
        ("data:\n  prompt_duration: [6, 3]\n", "data.prompt_duration", None),
        ("model: [1, 2]\n", "model must be a mapping", None),
        ("preset: smal\n", "no preset named 'smal'", "did you mean 'small'"),
        ("version: 99\n", "config version 99 is not supported", None),
        ("codec:\n  bandwidth: .nan\n", "codec.bandwidth must be a finite number", None),
        ("train:\n  lr: .inf\n", "train.lr must be a finite number", None),
        ("train:\n  betas: [0.9]\n", "train.betas must be two numbers", None),
        ("inference:\n  top_p: 5\n", "inference.top_p must be in (0, 1]", None),
        ("inference:\n  ar_temp: -1\n", "cannot be negative", None),
        ("data:\n  max_duration: 5\n  prompt_duration: [1, 10]\n", "exceeds data.max_duration", None),
        ("train:\n  level_weights: [1, 1]\n", "train.level_weights has 2 entries", None),
        ("train:\n  ar_only_steps: -5\n", "train.ar_only_steps cannot be negative", None),
        ("train:\n  scheduled_sampling: 1.5\n", "train.scheduled_sampling must be in [0, 1]", None),
        (
            "codec:\n  name: encodek\n",
            "codec.name: no codec plugin named 'encodek'",
            "did you mean 'encodec'",
        ),
        ("data:\n  transcriber: nosuch\n", "no transcriber plugin named 'nosuch'", "installed:"),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(tmp_path, yaml_text, message, hint):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in info.value.message
    if hint:
        assert hint in (info.value.remedy or "")


def test_yaml_syntax_error_points_at_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 32\n  n_layers: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)


def test_override_merges_into_dict_values():
    cfg = load_config("tiny", ["train.loss_weights.text=0.5"])
    assert cfg.train.loss_weights == {"text": 0.5, "prompt": 0.0, "response": 1.0}


def test_folder_as_config_or_output(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="is a folder"):
        dump_config(load_config("tiny"), tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        dump_config(load_config("tiny"), tmp_path / "no" / "x.yaml")


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/config.yaml")


def test_file_starts_from_preset_and_overrides_apply_last(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nmodel:\n  n_layers: 3\ntrain:\n  lr: 1e-4\n")
    cfg = load_config(
        path, ["model.n_layers=5", "train.lora.rank=8", "train.init_from=base", "data.paths=[a, b]"]
    )
    assert cfg.model.d_model == 64  # from the preset
    assert cfg.model.n_layers == 5  # override beats file beats preset
    assert cfg.train.lr == pytest.approx(1e-4)  # "1e-4" without a dot is a YAML string; coerced to float
    assert cfg.train.lora.rank == 8
    assert cfg.data.paths == ["a", "b"]


@pytest.mark.parametrize("bad", ["lr=3", "train.lr", "=3", ""])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override(bad)


def test_override_with_unknown_key_suggests():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["inference.ar_tmp=0.5"])
    assert "did you mean 'inference.ar_temp'" in info.value.remedy


def test_dump_round_trips(tmp_path):
    cfg = load_config("small", ["train.seed=7"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert out.read_text().startswith("version: 1\n")
