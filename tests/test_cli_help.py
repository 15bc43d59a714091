"""Every command and subcommand of every console script prints its --help.

argparse formats help lazily, so a bad help string (a bare "%" in a config field's help, once) only
fails when a user asks for help: build every parser and format every subcommand's help here.
"""

from __future__ import annotations

import argparse
import importlib

import pytest

CLIS = ["lm.cli", "seq2seq.cli", "forecast.cli", "serving.server", "serving.client_cli"]


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += subparsers(child)
    return found


@pytest.mark.parametrize("module", CLIS)
def test_every_subcommand_formats_its_help(module: str) -> None:
    parsers = subparsers(importlib.import_module(module).build_parser())
    for parser in parsers:
        text = parser.format_help()
        assert parser.prog in text
    assert len(parsers) >= 1
