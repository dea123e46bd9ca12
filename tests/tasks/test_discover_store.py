"""store:PREFIX drops: a prefix with nothing under it is named as such, relative to storage.prefix."""

from __future__ import annotations

import pytest

from radground.settings import load_settings
from radground.store import open_store
from tasks import discover

HEADER = b"accession_number,patient_id,study_date,language,report_text\n"


def test_missing_local_prefix_says_no_such_prefix_not_no_reports_csv(tmp_path, clean_env):
    settings = load_settings(data_dir=tmp_path / "data")
    open_store(settings).put("drops/a/reports.csv", HEADER)
    assert discover.DropReader("store:drops/a", settings).list_files() == ["reports.csv"]
    with pytest.raises(discover.DropError) as caught:
        discover.DropReader("store:drops/b", settings)
    message = str(caught.value)
    assert "no such prefix in the object store" in message and "no reports.csv" not in message
    assert str((tmp_path / "data" / "store" / "drops" / "b").absolute()) in message
    assert not discover.DropReader.available("store:drops/b", settings)
    # 'drops/' itself is no drop of its own, but a prefix with objects: its reports.csv is what is missing.
    open_store(settings).put("drops/c/x.dcm", b"x")
    with pytest.raises(discover.DropError, match="no reports.csv at its top"):
        discover.read_reports(discover.DropReader("store:drops/c", settings), "d")


@pytest.mark.integration
def test_s3_prefix_is_read_below_storage_prefix_and_a_missing_one_names_bucket_and_prefix(
        s3_server, make_s3_settings):
    settings = make_s3_settings(s3_server, prefix="site-a/")
    open_store(settings).put("drops/a/reports.csv", HEADER)  # stored as site-a/drops/a/reports.csv
    assert discover.DropReader("store:drops/a", settings).list_files() == ["reports.csv"]
    # The full key (storage.prefix included) is a common mistake: PREFIX is relative to storage.prefix.
    with pytest.raises(discover.DropError) as caught:
        discover.DropReader("store:site-a/drops/a", settings)
    message = str(caught.value)
    assert "no such prefix in the object store" in message
    assert f"bucket {settings.storage.bucket}, storage.prefix 'site-a/'" in message
    assert f"s3://{settings.storage.bucket}/site-a/site-a/drops/a/" in message
    assert "relative to storage.prefix" in message
    assert discover.DropReader.available("store:drops/a", settings)
    assert not discover.DropReader.available("store:drops/b", settings)
