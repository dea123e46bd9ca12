"""TotalSegmentator as a segmentation backend: task ``total`` for CT, ``total_mr`` for MR.

The series goes in as one NIfTI volume (radground.volume.series_to_nifti) and the multilabel
result comes back onto the DICOM pixel grid (radground.volume.nifti_labels_on_series), whatever
voxel order TotalSegmentator returns. Class ids: the ``total`` ids are already the merged ids
(1..117); ``total_mr`` ids map through each class's ``mr_id`` in the label map (e.g. 10
lung_left -> 118, 19 vertebrae -> 121). Nothing is downloaded at run time: TOTALSEG_HOME_DIR
points at ``segmentation.totalsegmentator_weights``, a folder filled once with
``totalseg_download_weights`` on a machine with internet. (TotalSegmentator also posts
anonymous usage counts unless that folder's config.json says ``"send_usage_stats": false``.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from radground.labels import label_map
from radground.runtime import temporary_environ
from radground.settings import SegmentationSettings
from radground.volume import nifti_labels_on_series, series_to_nifti
from tasks.segment.base import SegmentationError, SeriesVolume, check_mask

log = logging.getLogger(__name__)

TASKS = {"CT": "total", "MR": "total_mr"}
_WEIGHTS_SETTING = "segmentation.totalsegmentator_weights"
_SETUP_HINT = ("pip install totalsegmentator==2.18.0, download its weights once on a machine with internet "
               "(totalseg_download_weights -t total, and -t total_mr for MR; total_fast / total_fast_mr for "
               f"segmentation.totalsegmentator_fast), and set {_WEIGHTS_SETTING} to that folder "
               "(TotalSegmentator's home, ~/.totalsegmentator by default)")
# TotalSegmentator's device names: it falls back to the CPU itself when "gpu" finds no CUDA.
_DEVICES = {"auto": "gpu", "cuda": "gpu", "cpu": "cpu"}

Runner = Callable[..., Any]  # the signature of totalsegmentator.python_api.totalsegmentator


def lookup_table(task: str) -> np.ndarray:
    """(N,) uint8: TotalSegmentator class id of ``task`` -> merged id; 255 marks ids the task does not have."""
    labels = label_map()
    if task == "total":
        pairs = [(c.id, c.id) for c in labels if c.source_task == "total"]
    elif task == "total_mr":
        pairs = [(c.mr_id, c.id) for c in labels if c.mr_id is not None]
    else:
        raise ValueError(f"unknown TotalSegmentator task {task!r}; expected one of {sorted(TASKS.values())}")
    table = np.full(max(source for source, _ in pairs) + 1, 255, dtype=np.uint8)
    table[0] = 0
    for source, merged in pairs:
        table[source] = merged
    return table


class TotalSegmentatorBackend:
    """Whole-volume TotalSegmentator; ``runner`` replaces the real call (tests), and then neither
    the package nor the weights are needed."""

    name = "totalsegmentator"

    def __init__(self, settings: SegmentationSettings, runner: Runner | None = None) -> None:
        self.settings = settings
        # Checked here, before any series is read: a misconfigured run stops at once.
        weights = settings.totalsegmentator_weights
        if runner is None:
            self._weights: Path | None = _check_weights(weights)
        else:
            self._weights = Path(weights).expanduser() if weights is not None else None
        self._runner = runner if runner is not None else _import_runner()
        self._tables = {task: lookup_table(task) for task in TASKS.values()}

    def segment(self, volume: SeriesVolume) -> np.ndarray:
        """(S, H, W) uint8 merged class ids on the series' pixel grid."""
        task = TASKS.get(volume.modality)
        if task is None:
            raise SegmentationError(f"backend {self.name}: modality {volume.modality!r} has no TotalSegmentator task; "
                                    f"expected one of {sorted(TASKS)}.")
        started = time.perf_counter()
        image = series_to_nifti(volume)
        with _totalseg_home(self._weights):
            result = self._runner(input=image, output=None, task=task, fast=self.settings.totalsegmentator_fast,
                                  device=_DEVICES[self.settings.device], ml=True, quiet=True)
        if result is None or not hasattr(result, "dataobj"):
            raise SegmentationError(f"backend {self.name}: TotalSegmentator returned {type(result).__name__}; "
                                    "expected a multilabel NIfTI image (ml=True, output=None).")
        labels = nifti_labels_on_series(result, volume)  # (S, H, W) task ids on the DICOM grid
        mask = self._to_merged(labels, task)
        log.info("totalsegmentator: task %s, %d slices, %d classes, %.1f s", task, mask.shape[0],
                 np.count_nonzero(np.unique(mask)), time.perf_counter() - started)
        return check_mask(volume, mask, self.name)

    def _to_merged(self, labels: np.ndarray, task: str) -> np.ndarray:
        table = self._tables[task]
        merged = table[labels] if labels.size and int(labels.max()) < len(table) else None
        if labels.size and (merged is None or (merged == 255).any()):
            unknown = sorted(set(np.unique(labels).tolist()) - set(np.flatnonzero(table != 255).tolist()))
            raise SegmentationError(f"backend {self.name}: task {task} returned class ids {unknown[:10]} that its "
                                    "class map does not have; the installed totalsegmentator does not match "
                                    "radground/data/label_map.json. Install totalsegmentator==2.18.0 or "
                                    "regenerate the label map with scripts/generate_label_map.py.")
        return merged if merged is not None else labels.astype(np.uint8)


def _check_weights(weights: Path | None) -> Path:
    if weights is None:
        raise SegmentationError(f"backend totalsegmentator: {_WEIGHTS_SETTING} is not set; nothing is downloaded "
                                f"at run time. To set up: {_SETUP_HINT}.")
    path = Path(weights).expanduser()
    if not path.is_dir():
        raise SegmentationError(f"backend totalsegmentator: {_WEIGHTS_SETTING} = {path} is not a folder. "
                                f"To set up: {_SETUP_HINT}.")
    if not (path / "nnunet" / "results").is_dir():
        raise SegmentationError(f"backend totalsegmentator: {_WEIGHTS_SETTING} = {path} holds no nnunet/results "
                                "folder, so it is not a TotalSegmentator home with downloaded weights. "
                                f"To set up: {_SETUP_HINT}.")
    return path


def _import_runner() -> Runner:
    try:
        from totalsegmentator.python_api import totalsegmentator
    except ImportError as exc:
        raise SegmentationError(f"segmentation backend totalsegmentator needs the totalsegmentator package "
                                f"({exc}): {_SETUP_HINT}.") from None
    return totalsegmentator


@contextmanager
def _totalseg_home(weights: Path | None) -> Iterator[None]:
    """TOTALSEG_HOME_DIR -> the weights folder for the call (TOTALSEG_WEIGHTS_PATH would override it)."""
    if weights is None:
        yield
        return
    with temporary_environ({"TOTALSEG_HOME_DIR": str(weights)}, remove=("TOTALSEG_WEIGHTS_PATH",)):
        yield
