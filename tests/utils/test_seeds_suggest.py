"""The seed-list parser and the "did you mean" hint."""

from __future__ import annotations

import pytest

from hessdiff.utils.seeds import format_seeds, parse_seeds
from hessdiff.utils.suggest import did_you_mean


def test_seed_forms_keep_their_order():
    assert parse_seeds("0-15") == list(range(16))
    assert parse_seeds("0,3,7") == [0, 3, 7]
    assert parse_seeds("0-3,9") == [0, 1, 2, 3, 9]
    assert parse_seeds(" 7, 2,4 - 5") == [7, 2, 4, 5]
    assert parse_seeds(4) == [4] and parse_seeds([5, 2]) == [5, 2] and parse_seeds((1,)) == [1]
    assert parse_seeds(str(2**64 - 1)) == [2**64 - 1]


@pytest.mark.parametrize("bad, message", [
    ("5-2", "empty"), ("a", "cannot read"), ("1,,2", "empty entry"), ("-3", "cannot read"), ("3-", "cannot read"),
    ("1,1", "duplicate"), ("0-3,2", "duplicate"), ("", "empty entry"), ([], "no seeds"),
    ([0.5], "integers"), (True, "an int"), (-1, r"\[0, 2\^64\)"), (2**64, r"\[0, 2\^64\)"), (None, "an int"),
])
def test_bad_seeds(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_seeds(bad)


def test_seed_limits():
    with pytest.raises(ValueError, match="more than 10 seeds"):
        parse_seeds("0-10", limit=10)
    assert len(parse_seeds("0-9", limit=10)) == 10
    with pytest.raises(ValueError, match=r"\[0, 2\^63\)"):
        parse_seeds([2**63], bound=2**63)


def test_format_seeds_is_the_compact_sorted_form():
    assert format_seeds([11, 0, 1, 2, 3, 7, 10]) == "0-3,7,10-11"
    assert parse_seeds(format_seeds([9, 1, 2])) == [1, 2, 9]


def test_did_you_mean():
    assert did_you_mean("super_resolutoin", ["inpainting", "super_resolution"]) == "; did you mean 'super_resolution'?"
    assert did_you_mean("xyz", ["inpainting", "super_resolution"]) == ""
    assert did_you_mean("ddin", {"ddim": 1, "dpm": 2}) == "; did you mean 'ddim'?"
