"""The lockfile's TOML writer: whatever strings a project holds, the lockfile reads back as written."""

from __future__ import annotations

import sys
import warnings

from hypothesis import given, settings
from hypothesis import strategies as st

from runner import lockfile
from runner.lockfile import dumps

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Any character but surrogates (UTF-8 cannot hold them): control characters, DEL, quotes, backslashes.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
SCALARS = st.one_of(
    TEXT,
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)
TABLES = st.dictionaries(TEXT, st.dictionaries(TEXT, VALUES, max_size=5), max_size=4)


@settings(max_examples=200, deadline=None)
@given(data=st.dictionaries(TEXT, VALUES, max_size=5), steps=TABLES)
def test_any_data_round_trips(data, steps):
    document = {**data, "steps": steps}
    assert tomllib.loads(dumps(document)) == document


def digested(steps: dict) -> dict:
    return {sid: {**r, "digest": lockfile.record_digest(r)} for sid, r in steps.items()}


def test_the_lockfile_text_is_dumps_of_the_records_with_their_digests():
    steps = {
        "train:dog": {"fingerprint": "f", "output_hash": "o", "inputs": {"ü": [1, 2.5]}, "outputs": {}},
        "small": {"fingerprint": "g"},  # written inline
        "render:park": {"fingerprint": "h", "metrics": {"loss": float("inf")}, "outputs": {"a.png": {}}},
    }
    # The second text reuses what the first formatted, for the records that did not change.
    for records in (steps, {**steps, "render:park": {"fingerprint": "i"}}, {}):
        expected = dumps({"version": lockfile.LOCK_VERSION, "steps": digested(records)})
        assert lockfile._text(records) == expected


def test_a_write_formats_only_the_records_that_changed(tmp_path, monkeypatch):
    records = {f"train:s{i}": {"fingerprint": f"{i}", "output_hash": "o", "outputs": {}} for i in range(50)}
    lockfile.write(tmp_path / "p.lock", records)
    digests = []
    monkeypatch.setattr(lockfile, "record_digest", lambda r: digests.append(r) or "d")
    records["train:s7"] = {**records["train:s7"], "output_hash": "p"}
    lockfile.write(tmp_path / "p.lock", records)
    assert len(digests) == 1


def test_del_character_in_a_prompt_keeps_the_lockfile_readable(tmp_path):
    record = {
        "fingerprint": "f" * 64,
        "output_hash": "0" * 64,
        "inputs": {"prompts": ["a dog\u007f", "tab\there", "bell\u0007"]},
        "outputs": {},
    }
    path = tmp_path / "pets.lock"
    lockfile.write(path, {"render:park": record})
    assert lockfile.read(path)["render:park"]["inputs"] == record["inputs"]


def test_non_ascii_letters_in_a_key_are_quoted():
    # TOML bare keys are ASCII only; 'ü' alone is a letter to Python but not to TOML.
    document = {"files": {"ü": "x", "².png": "y"}}
    assert tomllib.loads(dumps(document)) == document


def test_a_record_with_a_nan_metric_keeps_its_digest(tmp_path):
    record = {"fingerprint": "f", "output_hash": "o", "outputs": {}, "metrics": {"loss": float("nan")}}
    path = tmp_path / "p.lock"
    lockfile.write(path, {"train:dog": record})
    with warnings.catch_warnings():
        warnings.simplefilter("error", lockfile.LockfileWarning)
        assert "train:dog" in lockfile.read(path)
