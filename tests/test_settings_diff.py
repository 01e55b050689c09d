"""`changed_settings`: the one walk over two nested records of settings behind the refusals that name what changed."""

import re

from clipcap_hf.utils.settings_diff import ABSENT, changed_settings

BEFORE = {"a": 1, "b": {"c": 2, "d": [1, 2], "e": None, "g": {"h": "x"}}, "gone": "x", "same": {"k": 1}, "z": {"y": 1}}
AFTER = {"a": 1, "b": {"c": 3, "d": [1, 2], "f": True, "g": {"h": "y"}}, "new": 0, "same": {"k": 1}, "z": 5}


def arrow(name, old, new) -> str:
    return f"{name}: {old!r} -> {new!r}"


def test_each_differing_key_is_named_with_both_values_nested_ones_by_their_dotted_keys():
    assert changed_settings(BEFORE, AFTER, arrow) == [
        "b.c: 2 -> 3",
        "b.e: None -> ABSENT",  # a None value is not a missing key
        "b.f: ABSENT -> True",
        "b.g.h: 'x' -> 'y'",
        "gone: 'x' -> ABSENT",
        "new: ABSENT -> 0",
        "z: {'y': 1} -> 5",  # a dict against a value: one difference
    ]
    assert changed_settings(AFTER, AFTER, arrow) == []
    assert changed_settings({}, {"a": {"b": 1}}, arrow) == ["a: ABSENT -> {'b': 1}"]
    assert changed_settings(BEFORE, AFTER, arrow, prefix="run.")[0] == "run.b.c: 2 -> 3"


def test_shared_only_leaves_out_added_and_removed_keys_at_every_depth():
    assert changed_settings(BEFORE, AFTER, arrow, shared_only=True) == [
        "b.c: 2 -> 3", "b.g.h: 'x' -> 'y'", "z: {'y': 1} -> 5"
    ]


def test_skip_leaves_out_keys_by_their_own_name_at_every_depth_with_what_they_hold():
    skip = re.compile(r"^c$|gone|^g$").search  # as embeddings' filter of settings that cannot change an embedding
    assert changed_settings(BEFORE, AFTER, arrow, skip=skip) == [
        "b.e: None -> ABSENT", "b.f: ABSENT -> True", "new: ABSENT -> 0", "z: {'y': 1} -> 5"
    ]
    assert changed_settings(BEFORE, AFTER, arrow, skip=lambda key: key == "b", shared_only=True) == [
        "z: {'y': 1} -> 5"
    ]


def test_describe_is_given_absent_for_a_missing_key_so_callers_word_it():
    given = []
    changed_settings({"a": 1}, {"b": 2}, lambda name, old, new: given.append((name, old, new)) or name)
    assert given == [("a", 1, ABSENT), ("b", ABSENT, 2)]
    assert repr(ABSENT) == "ABSENT"
