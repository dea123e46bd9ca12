"""Masks a drop carries itself (DICOM SEG or NIfTI), mapped exactly onto the series' slices.

A drop may carry masks in its `masks/` folder (name from `segmentation.masks_folder`):
- `masks/labels.yaml` (required when masks are present): `labels:` maps a NIfTI label value
  (int) or a DICOM SEG segment label (str, matched case-insensitively) to a class name of the
  label map; `series:` maps each NIfTI file (path relative to masks/) to the SeriesInstanceUID
  (as delivered, i.e. the source UID) of the series it labels.
- DICOM SEG objects (SOP Class Segmentation Storage 1.2.840.10008.5.1.4.1.1.66.4), binary or
  fractional, anywhere in `masks/`; each frame references its source image by
  ReferencedSOPInstanceUID (per-frame functional groups -> DerivationImageSequence /
  SourceImageSequence) — frames map to slices EXACTLY through
  `pseudonym_uid(key, referenced SOP uid) == image_id`.
- NIfTI label maps (`.nii` / `.nii.gz`) mapped with `nifti_labels_on_series` via the series
  given in labels.yaml (`pseudonym_uid(key, source series uid)` must equal the de-identified
  series uid the caller passes).

Example::

    labels:
      1: spleen
      5: liver
      Liver: liver        # a SEG segment label; "LIVER" and "liver" match too
    series:
      ct/abdomen.nii.gz: "1.2.826.0.1.3680043.2.1125.1.4711"   # quoted: a UID is text

Fractional SEG frames count where their value is at least 0.5. NIfTI files may store their
voxels in any order and on any grid (other grids are resampled nearest-neighbour). Where
several masks label one pixel of a series, the later wins: NIfTI files first, then SEG
objects, each in path order, and within a SEG the higher segment number. A SEG whose frames
reference no image of a series is not used for it. Other files in masks/ are ignored with a
warning. Messages name mask files by their path inside masks/ (the hospital's label files,
not patient files) and never quote SEG header values or source UIDs.
"""

from __future__ import annotations

import gzip
import io
import logging
from dataclasses import dataclass

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import yaml

from radground.keys import load_key
from radground.labels import label_map
from radground.settings import Settings
from radground.volume import nifti_labels_on_series
from tasks.deid import pseudonym_uid
from tasks.discover import DropReader, quiet_dicom
from tasks.segment.base import SegmentationError, SeriesVolume, check_mask

log = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELS_FILE = "labels.yaml"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_FIX = "See the README, 'Imported masks'."
_reported_without_masks: set[str] = set()  # drops already reported, so a per-series backend says it once


@dataclass(frozen=True)
class _SegIndex:
    path: str  # inside masks/
    sources: dict[str, str]  # pseudonym of each referenced SOP Instance UID -> that source UID


class ImportedBackend:
    """Labels from the masks a drop carries; all zeros for a drop without a masks folder."""

    name = "imported"

    def __init__(self, location: str, settings: Settings) -> None:
        self._reader = DropReader(location, settings)
        self._folder = settings.segmentation.masks_folder.strip("/")
        prefix = self._folder + "/"
        self._files = [p[len(prefix):] for p in self._reader.list_files() if p.startswith(prefix)]
        self._values: dict[int, int] = {}  # NIfTI label value -> class id
        self._segments: dict[str, int] = {}  # lower-cased SEG segment label -> class id
        self._niftis: dict[str, list[str]] = {}  # de-identified series uid -> NIfTI paths
        self._seg_index: list[_SegIndex] | None = None  # built on first use
        self._key = b""
        if not self._files:
            if location not in _reported_without_masks:
                _reported_without_masks.add(location)
                log.info("imported: drop %s has no %s/ folder; imported masks are all background", location,
                         self._folder)
            return
        if LABELS_FILE not in self._files:
            raise SegmentationError(f"imported: {self._folder}/ holds masks but no {LABELS_FILE}; add one that maps "
                                    f"label values / segment labels to class names and NIfTI files to series. {_FIX}")
        self._key = load_key(settings)
        self._read_labels()

    # ------------------------------------------------------------------ public
    def segment(self, volume: SeriesVolume, series_uid: str) -> np.ndarray:
        """(S, H, W) uint8 class ids from the drop's masks for this series; 0 where none labels a pixel."""
        mask = np.zeros(volume.values.shape, dtype=np.uint8)
        used = []
        for path in self._niftis.get(series_uid, []):
            self._paint_nifti(path, volume, mask)
            used.append(path)
        if self._files:
            slice_of = {image_id: k for k, image_id in enumerate(volume.image_ids)}
            for entry in self._index_segs():
                hits = {slice_of[p]: src for p, src in entry.sources.items() if p in slice_of}
                if hits:
                    self._paint_seg(entry.path, hits, volume, mask)
                    used.append(entry.path)
        if used:
            log.info("imported: series %s: %d slices labelled from %s", series_uid,
                     int(mask.any(axis=(1, 2)).sum()), ", ".join(used))
        return check_mask(volume, mask, self.name)

    def override(self, volume: SeriesVolume, series_uid: str, previous: np.ndarray) -> np.ndarray:
        """The previous backend's mask with every pixel the imported masks label replaced by their class."""
        previous = check_mask(volume, previous, "before imported")
        imported = self.segment(volume, series_uid)
        return np.where(imported > 0, imported, previous).astype(np.uint8)

    # ------------------------------------------------------------------ labels.yaml
    def _read_labels(self) -> None:
        where = f"{self._folder}/{LABELS_FILE}"
        try:
            spec = yaml.safe_load(self._reader.read(f"{self._folder}/{LABELS_FILE}"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" (line {mark.line + 1})" if mark is not None else ""
            raise SegmentationError(f"imported: {where} is not valid YAML{line}; fix its syntax. {_FIX}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("labels"), dict) or not spec["labels"]:
            raise SegmentationError(f"imported: {where} has no 'labels:' mapping; expected labels: {{label value or "
                                    f"segment label: class name}} (and series: for NIfTI files). {_FIX}")
        unknown_keys = sorted(set(spec) - {"labels", "series"})
        if unknown_keys:
            raise SegmentationError(f"imported: {where} has unknown top-level key(s) {unknown_keys}; expected only "
                                    f"'labels' and 'series'. {_FIX}")
        classes = label_map()
        for label, name in spec["labels"].items():
            if not isinstance(name, str) or name not in classes:
                raise SegmentationError(f"imported: {where}: label {label!r} maps to {name!r}, which is not a class "
                                        "of the label map; use a name from radground/data/label_map.json, e.g. "
                                        "'liver' or 'kidney_right'.")
            class_id = classes.by_name(name).id
            if isinstance(label, str) and label.strip():
                self._segments[label.strip().lower()] = class_id
            elif isinstance(label, int) and not isinstance(label, bool) and label > 0:
                self._values[label] = class_id
            else:
                raise SegmentationError(f"imported: {where}: label key {label!r} is neither a positive NIfTI label "
                                        "value (0 is background) nor a SEG segment label (text).")
        series = spec.get("series") or {}
        if not isinstance(series, dict):
            raise SegmentationError(f"imported: {where}: 'series:' must map NIfTI paths (relative to "
                                    f"{self._folder}/) to SeriesInstanceUIDs. {_FIX}")
        for path, uid in series.items():
            if str(path) not in self._files:
                raise SegmentationError(f"imported: {where}: series: lists {self._folder}/{path}, which is not in "
                                        f"the drop; fix the path (relative to {self._folder}/) or remove the entry.")
            if not isinstance(uid, str) or not uid.strip():
                raise SegmentationError(f"imported: {where}: series: {self._folder}/{path} needs the "
                                        "SeriesInstanceUID (as delivered, quoted) of the series it labels.")
            self._niftis.setdefault(pseudonym_uid(self._key, uid.strip()), []).append(str(path))
        for path in self._files:
            if path.endswith(_NIFTI_SUFFIXES) and path not in series:
                raise SegmentationError(f"imported: {self._folder}/{path} is a NIfTI label map but {where} names no "
                                        f"series for it; add it under series: with the SeriesInstanceUID it labels.")
        for paths in self._niftis.values():
            paths.sort()

    # ------------------------------------------------------------------ NIfTI
    def _paint_nifti(self, path: str, volume: SeriesVolume, mask: np.ndarray) -> None:
        data = self._reader.read(f"{self._folder}/{path}")
        try:
            image = nib.Nifti1Image.from_bytes(gzip.decompress(data) if path.endswith(".gz") else data)
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad file
            raise SegmentationError(f"imported: {self._folder}/{path} cannot be read as NIfTI "
                                    f"({type(exc).__name__}); re-export it as .nii or .nii.gz.") from None
        try:
            labels = nifti_labels_on_series(image, volume)  # (S, H, W) label values
        except SegmentationError as exc:
            raise SegmentationError(f"imported: {self._folder}/{path}: {exc}") from None
        values = [int(v) for v in np.unique(labels) if v]
        missing = [v for v in values if v not in self._values]
        if missing:
            raise SegmentationError(f"imported: {self._folder}/{path} holds label value(s) {missing[:10]} that "
                                    f"{self._folder}/{LABELS_FILE} does not map; add them under labels: with a "
                                    "class name each.")
        for value in values:
            mask[labels == value] = self._values[value]

    # ------------------------------------------------------------------ DICOM SEG
    def _index_segs(self) -> list[_SegIndex]:
        """Every SEG in masks/ with the pseudonyms of the images its frames reference (headers only)."""
        if self._seg_index is not None:
            return self._seg_index
        self._seg_index = []
        for path in self._files:
            if path == LABELS_FILE or path.endswith(_NIFTI_SUFFIXES):
                continue
            try:
                with quiet_dicom():  # pydicom's warnings may quote header values (PHI)
                    ds = pydicom.dcmread(io.BytesIO(self._reader.read(f"{self._folder}/{path}")),
                                         stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - whatever it is, it is not a readable SEG
                ds = None
            if ds is None or str(ds.get("SOPClassUID", "")) != SEG_STORAGE:
                log.warning("imported: %s/%s is neither a DICOM SEG nor a NIfTI label map; ignored", self._folder, path)
                continue
            sources = {}
            for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
                for derivation in frame.get("DerivationImageSequence", []):
                    for source in derivation.get("SourceImageSequence", []):
                        if str(source.get("SpatialLocationsPreserved", "YES")).upper() == "NO":
                            raise SegmentationError(
                                f"imported: {self._folder}/{path}: a frame says its pixels do not lie on its "
                                "source image's grid (SpatialLocationsPreserved NO); export the SEG on the "
                                "source images' grid.")
                        uid = str(source.get("ReferencedSOPInstanceUID", ""))
                        if uid:
                            sources[pseudonym_uid(self._key, uid)] = uid
            self._seg_index.append(_SegIndex(path, sources))
        return self._seg_index

    def _paint_seg(self, path: str, hits: dict[int, str], volume: SeriesVolume, mask: np.ndarray) -> None:
        where = f"{self._folder}/{path}"
        try:
            with quiet_dicom():
                seg = hd.seg.segread(io.BytesIO(self._reader.read(where)))
        except Exception as exc:  # noqa: BLE001 - highdicom raises many types for a malformed SEG
            raise SegmentationError(f"imported: {where} is not a valid DICOM SEG ({type(exc).__name__}); "
                                    "re-export it.") from None
        if (int(seg.Rows), int(seg.Columns)) != volume.values.shape[1:]:
            raise SegmentationError(f"imported: {where}: frames are {seg.Rows}x{seg.Columns} pixels but the images "
                                    f"they reference are {volume.values.shape[1]}x{volume.values.shape[2]}; a SEG "
                                    "must lie on its source images' grid.")
        numbers = sorted(seg.segment_numbers)
        class_ids = []
        for number in numbers:
            label = str(seg.get_segment_description(number).segment_label or "").strip()
            if label.lower() not in self._segments:
                raise SegmentationError(f"imported: {where}: segment {number} {label!r} is not under labels: in "
                                        f"{self._folder}/{LABELS_FILE}; add it with a class name.")
            class_ids.append(self._segments[label.lower()])
        slices = sorted(hits)
        with quiet_dicom():
            pixels = seg.get_pixels_by_source_instance(
                [hits[k] for k in slices], segment_numbers=numbers, ignore_spatial_locations=True,
                assert_missing_frames_are_empty=True)  # (N, H, W, segments); fractional rescaled to [0, 1]
        present = pixels >= 0.5 if np.issubdtype(pixels.dtype, np.floating) else pixels > 0
        for n, k in enumerate(slices):
            for s, class_id in enumerate(class_ids):  # higher segment numbers win overlaps
                mask[k][present[n, :, :, s]] = class_id
