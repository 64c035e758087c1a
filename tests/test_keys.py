import hashlib

import pytest
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    _validate_length_limit,
    _validate_metric_name,
    _validate_param_name,
    _validate_tag_name,
)

from pipeline.evaluate.keys import MAX_CLASS_KEY_CHARS, MLFLOW_MAX_KEY_CHARS, class_key, class_keys

AWKWARD = [
    "cat",
    "bird (small)",
    "bird [small]",
    "it's",
    'say "hi"',
    "a+b",
    "salt & pepper",
    "#1",
    "100%",
    "red,green",
    "x;y",
    "7up",
    "3",
    "n" * 150,
    "猫",
    "кошка",
    "café",  # NFC
    "cafe\u0301",  # the same word as macOS file systems store it (NFD)
    "ratio 1:2",
    ".hidden",
    "..",
    "tab\there",
    "Cat",
]
# The longest prefix the pipeline puts before a class key (per-class average precision on a split).
LONG_PREFIX = "train_average_precision_"


def _accepted_by_mlflow(key: str) -> None:
    for full in (key, f"{LONG_PREFIX}{key}", f"{key}_suffix"):
        _validate_metric_name(full)
        _validate_param_name(full)
        _validate_tag_name(full)
        _validate_length_limit("Metric name", MAX_ENTITY_KEY_LENGTH, full)


def test_every_awkward_name_gets_a_key_mlflow_accepts():
    keys = class_keys(AWKWARD)
    assert set(keys) == set(AWKWARD)
    for key in keys.values():
        _accepted_by_mlflow(key)
        assert "/" not in key and ":" not in key and len(key) <= MAX_CLASS_KEY_CHARS


def test_keys_are_distinct_even_ignoring_case():
    keys = class_keys(AWKWARD)
    assert len({k.casefold() for k in keys.values()}) == len(AWKWARD)


def test_allowed_names_map_to_themselves():
    keys = class_keys(["cat", "7up", "3", "猫", "кошка", "café", "big dog", "a-b.c_d"])
    assert all(key == name for name, key in keys.items())


def test_changed_names_are_readable_and_carry_the_hash_of_the_original():
    keys = class_keys(["bird (small)", "a+b", "n" * 150, "cafe\u0301"])
    digest = hashlib.sha256("bird (small)".encode()).hexdigest()[:8]
    assert keys["bird (small)"] == f"bird _small_-{digest}"
    assert keys["a+b"].startswith("a_b-")
    assert keys["n" * 150] == "n" * 91 + "-" + hashlib.sha256(("n" * 150).encode()).hexdigest()[:8]
    assert keys["cafe\u0301"].startswith("café-")  # NFD made NFC, then marked as changed


def test_names_that_would_map_alike_stay_apart():
    keys = class_keys(["a+b", "a&b", "a_b"])
    assert len(set(keys.values())) == 3
    # 'a_b' is allowed and clashes with nothing, so it keeps its own name.
    assert keys["a_b"] == "a_b"
    # A plain name equal to another's hashed key: both end up distinct.
    clash = class_key("a+b")
    keys = class_keys(["a+b", clash])
    assert len(set(keys.values())) == 2
    # Names equal ignoring case both get hashed keys.
    keys = class_keys(["Cat", "cat"])
    assert keys["Cat"] != keys["cat"] and keys["Cat"].startswith("Cat-") and keys["cat"].startswith("cat-")


def test_a_names_key_does_not_depend_on_the_other_names():
    alone = class_keys(["bird (small)"])["bird (small)"]
    assert class_keys(["dog", "bird (small)", "猫"])["bird (small)"] == alone
    assert class_keys(list(reversed(AWKWARD))) == class_keys(AWKWARD)


def test_mlflow_limit_constant_matches_mlflow():
    assert MLFLOW_MAX_KEY_CHARS == MAX_ENTITY_KEY_LENGTH
    assert len(LONG_PREFIX) + MAX_CLASS_KEY_CHARS + len("_suffix") <= MAX_ENTITY_KEY_LENGTH


@pytest.mark.parametrize("name", ["bird (small)", "n" * 150, "x/y", "a:b"])
def test_names_mlflow_refuses_are_changed(name):
    """Guard the test itself: these names as keys would be refused or unsafe, so they must change."""
    assert class_key(name) != name


def test_reserved_words_get_hashed_keys_so_averages_are_not_overwritten():
    keys = class_keys(["macro", "Weighted", "cat"], reserved=("macro", "weighted"))
    assert keys["macro"].startswith("macro-") and keys["Weighted"].startswith("Weighted-")
    assert keys["cat"] == "cat"
    assert class_keys(["macro"]) == {"macro": "macro"}  # nothing reserved, nothing changed
