"""Typed config: defaults → YAML → dotted overrides; every mistake is a ConfigError naming the key."""

from __future__ import annotations

import pytest

from sslmed.cli import main
from sslmed.config import CONFIG_DIR, Config, config_from_dict, load_config, save_config
from sslmed.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_overrides_take_precedence_with_types_converted(tmp_path):
    path = write(tmp_path, "train:\n  steps: 7\n  precision: bf16\noptim:\n  lr: 1\n  betas: [0.8, 0.9]\n")
    tags = "data.filter_tags={status: normal}"
    cfg = load_config(path, ["train.steps=9", "eval.label_fractions=0.5", tags])
    assert cfg.train.steps == 9 and cfg.train.precision == "bf16"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.eval.label_fractions == [0.5]
    assert cfg.data.filter_tags == {"status": "normal"}
    assert cfg.train.micro_batch == Config().train.micro_batch  # untouched keys keep their defaults


@pytest.mark.parametrize(("override", "named"), [
    ("train.stepz=3", "unknown key 'train.stepz'"),
    ("trian.steps=3", "unknown section 'trian'"),
    ("train.steps=many", "'train.steps' expects int"),
    ("train.steps=2.5", "'train.steps' expects int"),
    ("train.activation_checkpointing=1", "'train.activation_checkpointing' expects bool"),
    ("train.precision=fp8", "'train.precision' expects one of 'fp32', 'bf16', 'fp16'"),
    ("optim.betas=[0.9]", "'optim.betas' expects tuple"),
    ("train", "must look like section.key=value"),
    ("train.steps.x=1", "must be section.key"),
    ("train.zero_stage=4", "train.zero_stage must be 0, 1, 2 or 3"),
    ("train.grad_accum=0", "train.grad_accum must be at least 1"),
    ("checkpoint.keep=0", "checkpoint.keep must be at least 1"),
    ("data.crop_size=20", "must be a multiple of model.patch_size"),
])
def test_bad_overrides_name_the_key(override, named):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert named in str(error.value)


def test_bad_yaml_files_name_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'model.depthh'"):
        load_config(write(tmp_path, "model:\n  depthh: 3\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(write(tmp_path, "train: 3\n"))
    with pytest.raises(ConfigError, match="no shipped config of that name"):
        load_config("no-such-config")


def test_every_shipped_config_loads_and_round_trips(tmp_path):
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert "mae-tiny" in names and "simclr-tiny" in names
    for name in names:
        cfg = load_config(name)
        save_config(cfg, tmp_path / f"{name}.yaml")
        again = load_config(str(tmp_path / f"{name}.yaml"))
        assert again == cfg and again.digest() == cfg.digest()
    assert config_from_dict(load_config("mae-tiny").to_dict()) == load_config("mae-tiny")


def test_cli_refuses_a_bad_key_before_anything_starts(tmp_path, capsys):
    code = main(["pretrain", "mae-tiny", f"run.dir={tmp_path / 'run'}", "train.zero_stag=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sslmed: error:") and "train.zero_stag" in err
    assert not (tmp_path / "run").exists()
