"""tasks/ground_stage.py: what the ground summary says about the overlays asked for."""

from __future__ import annotations

from tasks.ground_stage import overlays_note


def test_overlays_are_named_where_they_are_or_why_there_are_none(tmp_path):
    drawn = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in drawn:
        path.write_bytes(b"png")
    summary = {"overlays": [str(p) for p in drawn], "overlays_requested": 2}
    assert overlays_note(summary) == f"; 2 overlays in {tmp_path}"
    # asked for, none drawn: say why instead of saying nothing
    none_grounded = {"overlays": [], "overlays_requested": 4}
    assert overlays_note(none_grounded) == "; no overlays: no slice of this drop is grounded"
    assert overlays_note({"overlays": []}) == ""  # none asked for
    drawn[0].unlink()  # a summary older than a clean-up names only what is still there
    assert overlays_note(summary) == f"; 1 overlays in {tmp_path}"
    drawn[1].unlink()
    assert overlays_note(summary) == ""
