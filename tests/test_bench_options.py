"""The benchmarks' ``--set`` option: checked when the arguments are parsed."""

from __future__ import annotations

import argparse

import pytest

from bench.runs import add_set_option, set_overrides


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench")
    add_set_option(parser)
    return parser.parse_args(list(argv))


def test_set_pairs_are_typed_and_a_later_pair_wins():
    args = _parse("--set", "lr=0.1", "--set", "model=scatter", "--set", "lr=0.05", "--set", "reproducible-noise=true")
    assert set_overrides(args) == {"lr": 0.05, "model": "scatter", "reproducible-noise": True}


@pytest.mark.parametrize("pair, says", [("lr", "KEY=VALUE"), ("lr-shedule=1", "unknown run-config key"),
                                        ("ema-decay=1", "ema-decay"), ("batch-size=x", "batch-size")])
def test_a_bad_set_pair_is_a_usage_error_naming_it(pair, says, capsys):
    with pytest.raises(SystemExit) as stop:
        _parse("--set", pair)
    assert stop.value.code == 2
    assert says in capsys.readouterr().err
