"""The training configs: one source of defaults per concept, flags generated from the sections, aliases."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from lm.config import ConfigError, TrainConfig, add_config_arguments, resumed_config
from lm.model import ModelConfig
from seq2seq.data import DataConfig
from seq2seq.model import Seq2SeqConfig
from seq2seq.train import TrainConfig as MTConfig


def parse(cls: type, *argv: str) -> dict:
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    add_config_arguments(parser, cls)
    return vars(parser.parse_args(list(argv)))


def test_the_model_section_is_the_model_config_so_its_defaults_live_in_one_place() -> None:
    lm = TrainConfig()
    assert {f.name for f in fields(lm.model)} == {f.name for f in fields(ModelConfig)} - {"vocab_size"}
    for f in fields(lm.model):
        assert getattr(lm.model, f.name) == f.default == getattr(ModelConfig(vocab_size=1), f.name)
    assert (lm.model.embed, lm.model.dropout) == (64, 0.2)
    mt = MTConfig()
    assert isinstance(mt.data, DataConfig)  # DataConfig's fields are inherited, not re-declared
    assert {f.name for f in fields(mt.model)} == {f.name for f in fields(Seq2SeqConfig)} - {
        "src_vocab",
        "tgt_vocab",
        "pad_id",
    }


def test_flat_names_are_unique_and_round_trip() -> None:
    for cls in (TrainConfig, MTConfig):
        config = cls()
        names = [f.name for s in config.SECTIONS for f in fields(getattr(config, s))]
        assert len(names) == len(set(names))
        assert cls.from_dict(config.to_dict()) == config
        assert cls.from_dict(config.to_sections()) == config


def test_flags_are_generated_with_help_defaults_and_aliases() -> None:
    assert parse(TrainConfig) == {}  # only what the user gives
    assert parse(TrainConfig, "--hidden", "32", "--no-progress", "--schedule", "cosine") == {
        "hidden": 32,
        "progress": False,
        "lr_schedule": "cosine",
    }
    assert parse(MTConfig, "--lr-schedule", "constant", "--label-smoothing", "0", "--src", "fr") == {
        "lr_schedule": "constant",
        "label_smoothing": 0.0,
        "src": "fr",
    }
    with pytest.raises(SystemExit):
        parse(TrainConfig, "--cell", "transformer")  # choices come from the field


def test_bad_values_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="--bptt must be >= 1"):
        TrainConfig.of(bptt=0)
    with pytest.raises(ConfigError, match="unknown setting 'hiden'"):
        TrainConfig.of(hiden=3)
    with pytest.raises(ConfigError, match="--lr-schedule noam needs --warmup-steps"):
        MTConfig.of(warmup_steps=0)


def test_resume_policy_run_section_only() -> None:
    stored = TrainConfig.of(hidden=32)
    assert resumed_config(stored, {"epochs": 3, "max-minutes": 1, "hidden": 32}).run.epochs == 3
    with pytest.raises(ConfigError, match="--resume cannot change --seed"):
        resumed_config(stored, {"seed": 5})
