"""The ground stage's I/O around tasks/ground.py: read mask records, write the grounding tables.

``ground_batch`` grounds a batch of curated reports against the mask records of their
studies; ``finish_ground`` writes ``ground/<drop_id>/{grounding,slices,vqa}.parquet``
and, on request, PNG overlays of grounded slices for a person to check.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from radground.errors import RadgroundError
from radground.imaging import pixels_from_bytes
from radground.overlay import render_overlay
from radground.schemas import GroundingRecord, MaskRecord, ReportRecord, SliceRecord, VQARecord
from radground.settings import Settings
from radground.store import open_store
from radground.tables import read_table, write_table
from tasks.ground import ground_study

logger = logging.getLogger(__name__)
STAGE = "ground"


@dataclass
class GroundOutcome:
    groundings: list[GroundingRecord] = field(default_factory=list)
    slices: list[SliceRecord] = field(default_factory=list)
    vqa: list[VQARecord] = field(default_factory=list)


def ground_batch(reports: Sequence[ReportRecord], mask_keys: Sequence[str], modalities: Mapping[str, str],
                 image_ids: Mapping[str, Sequence[str]], settings: Settings) -> GroundOutcome:
    """Ground each report on the slices of its study (mask records read from the given keys)."""
    store = open_store(settings)
    wanted = {r.study_uid for r in reports}
    by_study: dict[str, list[MaskRecord]] = defaultdict(list)
    for key in mask_keys:
        for row in read_table(store, key).to_pylist():
            if row["study_uid"] in wanted:
                by_study[row["study_uid"]].append(MaskRecord.model_validate(row))
    outcome = GroundOutcome()
    for report in reports:
        if report.study_uid not in modalities:  # no series of this study survived ingest/segment
            continue
        groundings, slices, vqa = ground_study(
            report, by_study[report.study_uid], settings.grounding, patient_pseudonym=report.patient_pseudonym,
            modality=modalities[report.study_uid], image_ids=image_ids.get(report.study_uid),
            vqa_settings=settings.vqa)
        outcome.groundings += groundings
        outcome.slices += slices
        outcome.vqa += vqa
    return outcome


def finish_ground(drop_id: str, outcomes: Sequence[GroundOutcome], image_keys: Sequence[str],
                  settings: Settings) -> dict:
    """Write the grounding, slices and slice-VQA tables (and overlays); return the summary."""
    groundings = [g for o in outcomes for g in o.groundings]
    slices = [s for o in outcomes for s in o.slices]
    vqa = [v for o in outcomes for v in o.vqa]
    store = open_store(settings)
    prefix = f"{STAGE}/{drop_id}/"
    write_table(store, prefix + "grounding.parquet", groundings, GroundingRecord)
    write_table(store, prefix + "slices.parquet", slices, SliceRecord)
    write_table(store, prefix + "vqa.parquet", vqa, VQARecord)
    spans = Counter((g.image_id, g.language, g.sentence_index, g.keyword_start) for g in groundings)
    summary = {
        "drop_id": drop_id,
        "grounded_pairs": len(groundings),
        "grounded_slices": sum(1 for s in slices if s.grounded),
        "ungrounded_slices_sampled": sum(1 for s in slices if not s.grounded),
        "mentions_grounded_on_both_sides": sum(1 for n in spans.values() if n > 1),
        "pairs_per_class": dict(Counter(g.class_name for g in groundings).most_common()),
        "slice_vqa_items": len(vqa),
        "overlays": [],
    }
    if settings.grounding.overlays:
        summary["overlays"] = [str(p) for p in write_overlays(drop_id, groundings, image_keys, settings,
                                                                settings.grounding.overlays)]
        summary["overlays_requested"] = settings.grounding.overlays
    store.put(prefix + "summary.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def summary_line(summary: dict) -> str:
    top = ", ".join(f"{name} {n}" for name, n in list(summary["pairs_per_class"].items())[:5])
    line = (f"ground {summary['drop_id']}: {summary['grounded_pairs']} grounded pairs on "
            f"{summary['grounded_slices']} slices (+{summary['ungrounded_slices_sampled']} ungrounded sampled), "
            f"{summary['mentions_grounded_on_both_sides']} mentions on both sides; top classes: {top or 'none'}")
    return line + overlays_note(summary)


def overlays_note(summary: dict) -> str:
    """What became of the overlays asked for: where they are, or why there are none."""
    if summary.get("overlays"):  # those still there: a summary may be older than a clean-up
        there = [Path(p) for p in summary["overlays"] if Path(p).is_file()]
        return f"; {len(there)} overlays in {there[0].parent}" if there else ""
    if summary.get("overlays_requested"):
        return "; no overlays: no slice of this drop is grounded"
    return ""


def overlays_from_store(drop_id: str, image_keys: Sequence[str], settings: Settings, count: int) -> list[Path]:
    """Overlays of a drop whose ground stage is current (``rebuild --overlays N`` on a built drop):
    drawn from the stored grounding, images and masks; PNGs already there are not drawn again."""
    store = open_store(settings)
    key = f"{STAGE}/{drop_id}/grounding.parquet"
    if not store.exists(key):
        return []
    groundings = [GroundingRecord.model_validate(r) for r in read_table(store, key).to_pylist()]
    chosen = _overlay_choice(groundings, count)
    folder = settings.data_dir / "overlays" / drop_id
    paths = [folder / f"{image_id}.png" for image_id in chosen]
    if all(p.is_file() for p in paths):
        return paths
    return write_overlays(drop_id, groundings, image_keys, settings, count)


def _overlay_choice(groundings: Sequence[GroundingRecord], count: int) -> list[str]:
    return sorted({g.image_id for g in groundings})[:count]


def write_overlays(drop_id: str, groundings: Sequence[GroundingRecord], image_keys: Sequence[str],
                   settings: Settings, count: int) -> list[Path]:
    """PNG overlays of the first ``count`` grounded slices under <data_dir>/overlays/<drop_id>/."""
    chosen = _overlay_choice(groundings, count)
    if not chosen:
        return []
    store = open_store(settings)
    masks = [MaskRecord.model_validate(r) for key in store.list(f"segment/{drop_id}/masks/")
             for r in read_table(store, key).to_pylist() if r["image_id"] in chosen]
    rows = {r["image_id"]: r for key in image_keys for r in read_table(store, key).to_pylist()
            if r["image_id"] in chosen}
    folder = settings.data_dir / "overlays" / drop_id
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for image_id in chosen:
        row = rows[image_id]
        picture = render_overlay(
            pixels_from_bytes(row["pixels"], row["pixel_dtype"], row["rows"], row["cols"]), row["modality"],
            [m for m in masks if m.image_id == image_id], [g for g in groundings if g.image_id == image_id],
            language=next(g.language for g in groundings if g.image_id == image_id))
        path = folder / f"{image_id}.png"
        picture.save(path)
        written.append(path)
    return written


def render_image(image_id: str, target: Path, language: str, settings: Settings) -> Path:
    """Find a slice in the store, render it with its masks and groundings, write a PNG."""
    store = open_store(settings)
    for key in store.list("ingest/"):
        if "/images/" not in key:
            continue
        rows = [r for r in read_table(store, key).to_pylist() if r["image_id"] == image_id]
        if rows:
            row = rows[0]
            break
    else:
        raise GroundingLookupError(
            f"image {image_id} is in no images table of {store.describe()}. Run `radground rebuild` first, "
            "or pick an image_id from ground/<drop_id>/slices.parquet.")
    drop = row["drop_id"]
    masks = [MaskRecord.model_validate(r) for key in store.list(f"segment/{drop}/masks/")
             for r in read_table(store, key).to_pylist() if r["image_id"] == image_id]
    groundings = []
    if store.exists(f"{STAGE}/{drop}/grounding.parquet"):
        groundings = [GroundingRecord.model_validate(r)
                      for r in read_table(store, f"{STAGE}/{drop}/grounding.parquet").to_pylist()
                      if r["image_id"] == image_id and r["language"] == language]
    picture = render_overlay(pixels_from_bytes(row["pixels"], row["pixel_dtype"], row["rows"], row["cols"]),
                             row["modality"], masks, groundings, language=language)
    target.parent.mkdir(parents=True, exist_ok=True)
    picture.save(target)
    return target


class GroundingLookupError(RadgroundError):
    """A slice asked for by id is not in the store."""
