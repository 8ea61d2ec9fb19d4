"""The rule interface's helpers: parameter parsers."""

from __future__ import annotations

import pytest

from convgraph.errors import UsageError
from convgraph.rule import Param, Rule, int_or, int_or_full


def test_int_or_parses_the_word_in_any_case_and_positive_integers() -> None:
    auto = int_or("auto")
    assert auto("auto") == auto("AUTO") == "auto" and auto("3") == 3 and auto(2) == 2
    assert int_or_full("Full") == "full" and int_or_full("1") == 1
    for bad in ("0", "-2"):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            auto(bad)
    with pytest.raises(ValueError):
        auto("full")  # another parser's word is not this one's
    assert auto.__name__ == "int_or_auto" and int_or_full.__name__ == "int_or_full"


def test_bad_param_value_is_a_usage_error() -> None:
    rule = Rule("r", "a rule", True, (Param("rank", 1, "rank", int_or_full),), match=lambda r, c: None,
                build=lambda r, c, p: None)
    assert rule.resolve_params({"rank": "full"}) == {"rank": "full"}
    with pytest.raises(UsageError, match="bad value '0' for param 'rank'.*positive integer or 'full'"):
        rule.resolve_params({"rank": "0"})
