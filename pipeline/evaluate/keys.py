"""Class names as MLflow key parts: map any folder name to a key MLflow accepts, distinct and stable.

MLflow (3.17, mlflow/utils/validation.py) accepts metric, param and tag keys made of `\\w` (Unicode
letters, digits, underscore), `-`, `.`, space, `/` and (except on Windows) `:`, that do not
normalise as a path to something else, and of at most 250 characters. A class name is only a part
of a key (`test_precision_<class>`), so its key is kept stricter, to be safe anywhere a key lands:

- a name made of letters/digits (any script), `_`, `-`, `.` and spaces, not starting with `.`,
  in Unicode NFC form and at most MAX_CLASS_KEY_CHARS long, is its own key (`cat`, `7up`, `猫`);
- any other name is NFKC-normalised, every other character (`( ) ' " + & # % , ; : /` ...) becomes
  `_`, it is cut to fit, and `-` plus the first 8 hex digits of the SHA-256 of the original name is
  appended: `bird (small)` -> `bird _small_-<8 hex>`;
- names whose keys would be equal, ignoring case (case-insensitive file systems and databases
  hold MLflow stores too), all get the hashed form, so distinct names keep distinct keys; so does
  a name whose key would equal a reserved word the caller names (`macro` beside `test_f1_macro`).

A name's key depends on that name alone unless it collides with another name's key. No `/` or
`:` ever appears in a key, so it cannot turn a file name into a path either.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from collections.abc import Collection

MLFLOW_MAX_KEY_CHARS = 250  # MLflow's MAX_ENTITY_KEY_LENGTH; the core does not import mlflow
MAX_CLASS_KEY_CHARS = 100  # leaves 150 characters for prefixes such as `test_average_precision_`
HASH_CHARS = 8  # 32 bits: a clash among a few thousand class names is ~1e-3 and is still resolved
_KEY_CHARS = re.compile(r"[\w\-. ]")
_MAX_ROUNDS = 16


def _is_plain(name: str) -> bool:
    return (
        0 < len(name) <= MAX_CLASS_KEY_CHARS
        and not name.startswith(".")
        and unicodedata.normalize("NFC", name) == name
        and all(_KEY_CHARS.fullmatch(ch) for ch in name)
    )


def _digest(name: str, rounds: int) -> str:
    salted = name if rounds == 0 else f"{rounds}\0{name}"  # another round only after a hash clash
    return hashlib.sha256(salted.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]


def _hashed_key(name: str, rounds: int = 0) -> str:
    text = unicodedata.normalize("NFKC", name)
    text = "".join(ch if _KEY_CHARS.fullmatch(ch) else "_" for ch in text)
    text = "_" + text[1:] if text.startswith(".") else text
    return f"{text[: MAX_CLASS_KEY_CHARS - HASH_CHARS - 1]}-{_digest(name, rounds)}"


def class_key(name: str) -> str:
    """The key of one name on its own (class_keys also keeps it apart from the other names' keys)."""
    return name if _is_plain(name) else _hashed_key(name)


def _clashing(keys: dict[str, str], reserved: set[str]) -> list[str]:
    groups: dict[str, list[str]] = defaultdict(list)
    for name, key in keys.items():
        groups[key.casefold()].append(name)
    return sorted(name for key, group in groups.items() if len(group) > 1 or key in reserved for name in group)


def class_keys(class_names: list[str], reserved: Collection[str] = ()) -> dict[str, str]:
    """{class name: key} for every name, each key allowed in an MLflow key and unique ignoring case.

    `reserved`: words a key must not equal (ignoring case), e.g. ("macro", "weighted"), so that a
    class named `macro` cannot overwrite `test_f1_macro`; such a name gets its hashed key."""
    keys = {name: class_key(name) for name in class_names}
    taken = {word.casefold() for word in reserved}
    for rounds in range(_MAX_ROUNDS):
        clashing = _clashing(keys, taken)
        if not clashing:
            return keys
        for name in clashing:
            keys[name] = _hashed_key(name, rounds)
    # Unreachable in practice: it would take a SHA-256 prefix clash in every one of 16 salted rounds.
    raise ValueError(f"could not give distinct keys to class names {_clashing(keys, taken)[:5]}")
