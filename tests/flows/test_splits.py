"""Patient splits across a change of `version` ratios, through the real rebuild flow (issue 15 item 4).

Drop A is built with one set of ratios, then drop B is added under other ratios: no patient of the
first version may change split (the version stage carries the parent's splits over), and B's new
patients must follow the new ratios.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.rebuild import run_rebuild
from radground.settings import VersionSettings, load_settings
from radground.synth.drop import generate_drop
from tasks.version import assign_splits, read_manifest, read_splits

pytestmark = [pytest.mark.slow, pytest.mark.integration]

KEY = "splits-flow-test-key-0123456789abcdef"

# The ratios are chosen so that the old and the new assignment differ for EVERY hash position x in
# [0, 1), whatever the pseudonyms are: the old ratios put x < 0.5 in train and the rest in val, the
# new ones put x < 0.5 in val and the rest in test. So the result does not depend on luck (with
# 0.8/0.1/0.1 -> 0.2/0.4/0.4 a patient keeps its split by chance 30% of the time, all three of drop
# A's patients 2.7% of the time): every patient of drop A moves if the version stage recomputes splits
# instead of carrying the parent's over, and every new patient of drop B lands in a split the old
# ratios could not have given it.
OLD = {"train": 0.5, "val": 0.5, "test": 0.0}
NEW = {"train": 0.0, "val": 0.5, "test": 0.5}


def bucket(patient: str, key: bytes, ratios: dict[str, float]) -> str:
    """The split a patient gets from the ratios alone: the documented recipe, recomputed here
    (HMAC-SHA256(key, "split" NUL pseudonym), the first 8 bytes as a fraction of 2**64)."""
    digest = hmac.new(key, b"split\x00" + patient.encode(), hashlib.sha256).digest()
    x = int.from_bytes(digest[:8], "big") / 2**64
    return "train" if x < ratios["train"] else "val" if x < ratios["train"] + ratios["val"] else "test"


def test_a_ratio_change_moves_no_earlier_patient_and_new_patients_follow_the_new_ratios(tmp_path: Path) -> None:
    drop_a = generate_drop(tmp_path / "drop-a", patients=3, seed=61).drop_dir
    drop_b = generate_drop(tmp_path / "drop-b", patients=2, seed=62).drop_dir
    key = KEY.encode()

    old = load_settings(data_dir=tmp_path / "data", deid={"key": KEY}, version=OLD)
    (first,) = run_rebuild([str(drop_a)], old)
    before = read_splits(first.version["version_dir"])
    assert len(before) == 3 and before == {p: bucket(p, key, OLD) for p in before}
    # The sensitivity of this test, certain by the choice of ratios: each of A's patients would move.
    assert all(bucket(p, key, NEW) != split for p, split in before.items())

    new = load_settings(data_dir=tmp_path / "data", deid={"key": KEY}, version=NEW)
    (added,) = run_rebuild([str(drop_b)], new)  # the version: the latest one's drops (A) + B
    version_dir = Path(added.version["version_dir"])
    manifest = read_manifest(version_dir)
    assert manifest.parent_digest == first.version["digest"]
    assert manifest.drops == [first.ingest.drop_id, added.ingest.drop_id]
    after = read_splits(version_dir)

    assert {p: after[p] for p in before} == before  # no patient of the first version changed split

    images = pq.read_table(version_dir / "images", columns=["patient_pseudonym", "drop_id"]).to_pylist()
    b_patients = {r["patient_pseudonym"] for r in images if r["drop_id"] == added.ingest.drop_id}
    assert len(b_patients) == 2 and not b_patients & set(before)
    assert set(after) == set(before) | b_patients
    new_ones = {p: after[p] for p in b_patients}
    # B's patients follow the NEW ratios: as assign_splits gives them with no history, and as the
    # recipe recomputed here gives them ...
    assert new_ones == assign_splits(sorted(b_patients), {}, VersionSettings(**NEW), key)
    assert new_ones == {p: bucket(p, key, NEW) for p in b_patients}
    # ... in a split the old ratios would not have given them (so the new ratios were really used).
    assert all(split != bucket(p, key, OLD) for p, split in new_ones.items())
    assert set(new_ones.values()) <= {"val", "test"}
