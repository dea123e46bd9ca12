"""TotalSegmentator backend: task per modality, id mapping, grid, and setup errors - without the package.

A fake runner stands in for totalsegmentator.python_api.totalsegmentator: it labels voxels by
their world (RAS) coordinates and answers in canonical voxel order, so the result must be
reoriented. Expected labels come from the DICOM geometry alone (IPP + i * column spacing *
row cosines + j * row spacing * column cosines; LPS, whose +x is the patient's left, while
RAS +x is the patient's right).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radground.settings import SegmentationSettings
from tasks.segment.base import SegmentationBackend, SegmentationError, SeriesVolume, check_mask
from tasks.segment.totalseg import TotalSegmentatorBackend, lookup_table

# total_mr id -> merged id, written out from docs/method.md / TotalSegmentator's class maps (not from the code).
MR_TO_MERGED = {0: 0, 1: 1, 5: 5, 10: 118, 11: 119, 19: 121, 20: 120, 23: 52, 50: 90}
CT_IDS = [0, 1, 5, 10, 27, 51, 52, 90, 117]


def make_volume(modality: str, orientation: tuple[float, ...], step: tuple[float, float, float],
                shape: tuple[int, int, int] = (5, 14, 11)) -> SeriesVolume:
    n_slices = shape[0]
    positions = np.array([-6.2, 3.7, 20.3]) + np.arange(n_slices)[:, None] * np.asarray(step)
    values = np.arange(np.prod(shape)).reshape(shape)
    values = values.astype(np.uint16) if modality == "MR" else (values - 1000).astype(np.int16)
    return SeriesVolume(image_ids=tuple(f"img{k}" for k in range(n_slices)), modality=modality, values=values,
                        orientation=orientation, positions=positions, spacing=(1.1, 0.9))


def dicom_world_ras(volume: SeriesVolume) -> np.ndarray:
    """(S, H, W, 3) RAS mm of every pixel centre from the DICOM geometry."""
    row_mm, col_mm = volume.spacing
    _, height, width = volume.values.shape
    jj, ii = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    lps = (volume.positions[:, None, None, :] + ii[None, :, :, None] * col_mm * volume.row_direction
           + jj[None, :, :, None] * row_mm * volume.column_direction)
    return lps * np.array([-1.0, -1.0, 1.0])


def pick(ras: np.ndarray, ids: list[int]) -> np.ndarray:
    """An id per point from 3.1 x 2.3 x 2.9 mm world cells (offsets keep pixel centres off the edges)."""
    cell = np.floor((ras + np.array([0.31, 0.17, -0.23])) / np.array([3.1, 2.3, 2.9]))
    return np.asarray(ids, dtype=np.uint8)[np.mod(cell[..., 0] + 2 * cell[..., 1] + 5 * cell[..., 2],
                                                  len(ids)).astype(int)]


class FakeTotalSegmentator:
    """Records its keyword arguments; answers with world-coordinate labels in canonical order."""

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.calls = ids, []

    def __call__(self, **kwargs):
        self.calls.append({**kwargs, "env": os.environ.get("TOTALSEG_HOME_DIR")})
        image = kwargs["input"]
        ijk = np.indices(image.shape).reshape(3, -1)
        ras = (image.affine[:3, :3] @ ijk + image.affine[:3, 3:]).T.reshape(*image.shape, 3)
        return nib.as_closest_canonical(nib.Nifti1Image(pick(ras, self.ids), image.affine))


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A folder laid out like TotalSegmentator's home (no real weights)."""
    (tmp_path / "nnunet" / "results").mkdir(parents=True)
    return tmp_path


def test_ct_ids_pass_through_on_the_dicom_grid() -> None:
    volume = make_volume("CT", (1, 0, 0, 0, 1, 0), (0, 0, -2.5))  # supine axial, head to feet
    runner = FakeTotalSegmentator(CT_IDS)
    backend = TotalSegmentatorBackend(SegmentationSettings(), runner=runner)
    mask = backend.segment(volume)
    assert mask.dtype == np.uint8 and mask.shape == volume.values.shape
    np.testing.assert_array_equal(mask, pick(dicom_world_ras(volume), CT_IDS))
    assert len(np.unique(mask)) > 4
    (call,) = runner.calls
    assert {k: call[k] for k in ("output", "task", "fast", "device", "ml", "quiet")} == {
        "output": None, "task": "total", "fast": False, "device": "gpu", "ml": True, "quiet": True}
    assert isinstance(call["input"], nib.Nifti1Image) and call["input"].get_data_dtype() == np.int16


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 0, -1), (-1, 0, 0, 0, -1, 0)], ids=["coronal", "prone"])
def test_mr_ids_map_through_mr_id(orientation: tuple[float, ...]) -> None:
    step = (0, 1.8, 0) if orientation[5] else (0, 0, 3.0)
    volume = make_volume("MR", orientation, step)
    runner = FakeTotalSegmentator(sorted(MR_TO_MERGED))
    settings = SegmentationSettings(totalsegmentator_fast=True, device="cpu")
    mask = TotalSegmentatorBackend(settings, runner=runner).segment(volume)
    mr_ids = pick(dicom_world_ras(volume), sorted(MR_TO_MERGED))
    expected = np.vectorize(MR_TO_MERGED.__getitem__)(mr_ids).astype(np.uint8)
    np.testing.assert_array_equal(mask, expected)
    assert {118, 121, 1} <= set(np.unique(mask).tolist())
    (call,) = runner.calls
    assert (call["task"], call["fast"], call["device"]) == ("total_mr", True, "cpu")
    assert call["input"].get_data_dtype() == np.uint16


def test_lookup_tables() -> None:
    mr = lookup_table("total_mr")
    assert (mr[10], mr[19], mr[1], mr[11], mr[20], mr[23], mr[50]) == (118, 121, 1, 119, 120, 52, 90)
    mapped = mr[1:51]
    assert (mapped != 255).all() and len(set(mapped.tolist())) == 50  # every total_mr class, each once
    ct = lookup_table("total")
    assert len(ct) == 118 and (ct == np.arange(118)).all()


@pytest.mark.parametrize(("modality", "ids", "bad"), [("MR", [0, 1, 51], 51), ("CT", [0, 5, 118], 118)])
def test_ids_outside_the_task_are_refused(modality: str, ids: list[int], bad: int) -> None:
    volume = make_volume(modality, (1, 0, 0, 0, 1, 0), (0, 0, 2.0))
    backend = TotalSegmentatorBackend(SegmentationSettings(), runner=FakeTotalSegmentator(ids))
    with pytest.raises(SegmentationError, match=rf"class ids \[{bad}\].*totalsegmentator==2.18.0"):
        backend.segment(volume)


def test_output_passes_check_mask_and_the_protocol() -> None:
    volume = make_volume("CT", (1, 0, 0, 0, 1, 0), (0, 0, 2.0))
    backend = TotalSegmentatorBackend(SegmentationSettings(), runner=FakeTotalSegmentator(CT_IDS))
    assert isinstance(backend, SegmentationBackend) and backend.name == "totalsegmentator"
    mask = backend.segment(volume)
    np.testing.assert_array_equal(check_mask(volume, mask, backend.name), mask)


def test_weights_folder_is_home_during_the_call(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", "/elsewhere")  # would override the home's weights
    monkeypatch.delenv("TOTALSEG_HOME_DIR", raising=False)
    runner = FakeTotalSegmentator(CT_IDS)
    backend = TotalSegmentatorBackend(SegmentationSettings(totalsegmentator_weights=weights), runner=runner)
    backend.segment(make_volume("CT", (1, 0, 0, 0, 1, 0), (0, 0, 2.0)))
    assert runner.calls[0]["env"] == str(weights)
    assert "TOTALSEG_HOME_DIR" not in os.environ and os.environ["TOTALSEG_WEIGHTS_PATH"] == "/elsewhere"


def test_missing_package(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "totalsegmentator", None)  # import fails even where it is installed
    monkeypatch.setitem(sys.modules, "totalsegmentator.python_api", None)
    with pytest.raises(SegmentationError, match=r"pip install totalsegmentator.*totalseg_download_weights -t total"):
        TotalSegmentatorBackend(SegmentationSettings(totalsegmentator_weights=weights))


@pytest.mark.parametrize("case", ["unset", "missing", "not_a_home"])
def test_missing_weights(case: str, tmp_path: Path) -> None:
    path = {"unset": None, "missing": tmp_path / "nope", "not_a_home": tmp_path}[case]
    with pytest.raises(SegmentationError, match=r"segmentation\.totalsegmentator_weights"):
        TotalSegmentatorBackend(SegmentationSettings(totalsegmentator_weights=path))


def test_unsupported_modality_and_bad_result() -> None:
    volume = make_volume("CT", (1, 0, 0, 0, 1, 0), (0, 0, 2.0))
    other = SeriesVolume(volume.image_ids, "PT", volume.values, volume.orientation, volume.positions, volume.spacing)
    with pytest.raises(SegmentationError, match="modality 'PT'"):
        TotalSegmentatorBackend(SegmentationSettings(), runner=FakeTotalSegmentator(CT_IDS)).segment(other)
    with pytest.raises(SegmentationError, match="expected a multilabel NIfTI image"):
        TotalSegmentatorBackend(SegmentationSettings(), runner=lambda **kwargs: None).segment(volume)


@pytest.mark.slow
@pytest.mark.gpu
def test_real_totalsegmentator_run() -> None:
    """The real package on a synthetic volume; needs the package and RADGROUND_TEST_TOTALSEG_WEIGHTS."""
    pytest.importorskip("totalsegmentator", reason="the totalsegmentator package is not installed")
    weights = os.environ.get("RADGROUND_TEST_TOTALSEG_WEIGHTS")
    if not weights:
        pytest.skip("RADGROUND_TEST_TOTALSEG_WEIGHTS does not name a folder with TotalSegmentator weights")
    volume = make_volume("CT", (1, 0, 0, 0, 1, 0), (0, 0, 2.0), shape=(40, 64, 64))
    settings = SegmentationSettings(totalsegmentator_weights=Path(weights), totalsegmentator_fast=True)
    mask = TotalSegmentatorBackend(settings).segment(volume)
    np.testing.assert_array_equal(check_mask(volume, mask, "totalsegmentator"), mask)
