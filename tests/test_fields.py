"""The typed-config engine on a toy config: coercion, command-line text, checks and flags, each with its message."""
import argparse
from dataclasses import dataclass
from typing import List, Optional, Union

import pytest

from gcvimoe.errors import GcvimoeError
from gcvimoe.fields import AT_LEAST_1, Check, Fields, option


@dataclass
class Toy:
    steps: int = option(3, "how many steps", check=AT_LEAST_1)
    rate: float = option(0.1, "a rate")
    window: Optional[List[float]] = option(None, "a range")
    mode: Union[bool, str] = option(False, "a switch with a mode", choices=(False, True, "fast"))
    verbose: bool = option(True, "talk")
    cap: int = option(4, "at most steps + 1", check=Check(lambda cap, toy: cap <= toy.steps + 1,
                                                           "must be at most steps + 1 = {config.steps}+1"))


FIELDS = Fields(Toy)


@pytest.mark.parametrize("name, value, expected", [
    ("rate", "5e-3", 0.005), ("rate", 2, 2.0), ("window", [1, "2e0"], [1.0, 2.0]), ("window", None, None),
    ("mode", "fast", "fast"), ("mode", True, True),
])
def test_coerce_reads_yaml_values_into_the_declared_type(name, value, expected):
    assert FIELDS.coerce(name, value) == expected and type(FIELDS.coerce(name, value)) is type(expected)


@pytest.mark.parametrize("name, value, message", [
    ("steps", 2.5, "config key 'steps' must be an integer, got 2.5"),
    ("steps", True, "config key 'steps' must be an integer, got True"),
    ("window", 0.5, "config key 'window' must be a list of numbers or null, got 0.5"),
    ("mode", "slow", "config key 'mode' must be one of false, true, fast, got 'slow'"),
])
def test_coerce_errors_name_the_key_and_the_type(name, value, message):
    with pytest.raises(GcvimoeError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        FIELDS.coerce(name, value)


@pytest.mark.parametrize("name, text, expected", [
    ("window", "0.5,1", [0.5, 1.0]), ("window", "[0.5, 1]", [0.5, 1]), ("window", "null", None),
    ("mode", "on", True), ("mode", "fast", "fast"), ("verbose", "no", False),
])
def test_parse_text_reads_command_line_values(name, text, expected):
    assert FIELDS.parse_text(name, text) == expected


def test_parse_text_error_names_the_flag():
    with pytest.raises(GcvimoeError, match="^--steps must be an integer, got 'many'$"):
        FIELDS.parse_text("steps", "many")


def test_check_runs_the_declared_checks_with_the_config():
    FIELDS.check(Toy())
    with pytest.raises(GcvimoeError, match="^config key 'steps' must be at least 1, got 0$"):
        FIELDS.check(Toy(steps=0, cap=1))
    with pytest.raises(GcvimoeError, match=r"^config key 'cap' must be at most steps \+ 1 = 3\+1, got 5$"):
        FIELDS.check(Toy(cap=5))
    with pytest.raises(GcvimoeError, match="^config key 'verbose' must be true or false, got 1$"):
        FIELDS.check(Toy(verbose=1))
    with pytest.raises(GcvimoeError, match="^config key 'rate' must be a finite number, got nan$"):
        Fields(Toy, finite=True).check(Toy(rate=float("nan")))


def test_flags_are_absent_unless_given_and_switches_take_no_value():
    parser = argparse.ArgumentParser()
    defaults = {"steps": 3, "mode": False, "verbose": True}
    FIELDS.add_flags(parser, defaults, headings={"steps": "toy keys"}, negatable=True)
    assert FIELDS.from_args(parser.parse_args([])) == {}
    assert FIELDS.from_args(parser.parse_args(["--steps", "5", "--mode", "--no-verbose"])) == {
        "steps": 5, "mode": True, "verbose": False}
    assert FIELDS.from_args(parser.parse_args(["--mode", "fast"])) == {"mode": "fast"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--rate", "1"])  # not in defaults: no flag
