"""One spelling per drop location, so the drop registry recognises a drop however it is typed."""

from pathlib import Path

from tasks.discover import canonical_location


def test_folder_spellings_of_one_drop_are_one_location(tmp_path, monkeypatch):
    (tmp_path / "drops" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spellings = ["drops/a", "drops/a/", "./drops/a", str(tmp_path / "drops" / "a"), "drops/../drops/a"]
    assert {canonical_location(s) for s in spellings} == {str(tmp_path / "drops" / "a")}


def test_the_location_does_not_depend_on_the_directory_it_was_typed_in(tmp_path, monkeypatch):
    (tmp_path / "x" / "drops" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "x")
    here = canonical_location("drops/a")
    monkeypatch.chdir(tmp_path)
    assert canonical_location("x/drops/a") == here
    assert Path(here).is_absolute()


def test_store_prefixes_lose_their_outer_slashes_only():
    assert canonical_location("store:/site-a/drops/0412/") == "store:site-a/drops/0412"
    assert canonical_location("store:site-a/drops/0412") == "store:site-a/drops/0412"
