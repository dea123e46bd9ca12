"""The segment stage: backend chain, mask records per series, failures quarantined per series."""

from __future__ import annotations

import pytest

from radground.settings import load_settings
from radground.store import open_store
from radground.synth.drop import generate_drop
from radground.tables import read_table
from tasks import discover
from tasks.segment import stage


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, run_ingest):
    root = tmp_path_factory.mktemp("segment")
    drop = generate_drop(root / "drop", patients=2, seed=9)
    settings = load_settings(data_dir=root / "data", deid={"key": "s" * 40})
    plan, summary = run_ingest(str(drop.drop_dir), settings)
    keys = list(open_store(settings).list(f"ingest/{summary.drop_id}/images/"))
    return str(drop.drop_dir), settings, summary.drop_id, keys


def test_classical_chain_writes_mask_records_on_the_slice_grid(ingested):
    location, settings, drop_id, keys = ingested
    outcomes = stage.segment_series(location, drop_id, keys, settings)
    assert len(outcomes) == len(keys) and all(o.mask_key for o in outcomes)
    store = open_store(settings)
    ct = [o for o in outcomes if o.modality == "CT"]
    assert ct and all({"lung_left", "lung_right", "vertebrae"} <= set(o.classes) for o in ct)
    for outcome in outcomes:
        rows = read_table(store, outcome.mask_key).to_pylist()
        assert {r["image_id"] for r in rows} <= set(outcome.image_ids)
        assert all(r["backend"] == "classical" and r["area_px"] >= settings.grounding.min_area_px for r in rows)
    summary = stage.summarise(drop_id, outcomes, settings)
    assert summary["series_segmented"] == len(keys) and "segment" in stage.summary_line(summary)


def test_a_backend_that_cannot_run_quarantines_the_series_not_the_flow(ingested, tmp_path):
    location, settings, drop_id, keys = ingested
    broken = settings.model_copy(update={"segmentation": settings.segmentation.model_copy(
        update={"backend": ["totalsegmentator"]})})  # no weights configured
    outcomes = stage.segment_series(location, drop_id, keys[:1], broken)
    assert outcomes[0].mask_key is None
    (row,) = outcomes[0].quarantine
    assert row.reason == "segmentation_failed" and "totalsegmentator" in row.detail


def test_sam_needs_a_backend_before_it_and_the_settings_say_so_up_front():
    from radground.errors import ConfigError

    with pytest.raises(ConfigError, match=r"segmentation\.backend = \['sam'\].*put it after one"):
        load_settings(segmentation={"backend": ["sam"]})
    with pytest.raises(ConfigError, match="appear once"):
        load_settings(segmentation={"backend": ["classical", "classical"]})


def test_the_masks_folder_is_not_scanned_as_images():
    settings = load_settings()
    images, masks = discover.image_candidates(
        ["reports.csv", "drop.yaml", "a/IM1", "masks/labels.yaml", "masks/seg/x.dcm", "masksX/IM2"], settings)
    assert images == ["a/IM1", "masksX/IM2"] and masks == ["masks/labels.yaml", "masks/seg/x.dcm"]
