"""radground.volume: a NIfTI built from a series, and labels coming back, sit on exactly the DICOM grid.

Expected values come from the DICOM geometry alone: the centre of pixel (row j, column i) of
slice k is IPP_k + i * column_spacing * row_cosines + j * row_spacing * column_cosines (LPS mm).
LPS +x is the patient's LEFT; NIfTI's RAS +x is the patient's RIGHT, so RAS = LPS * (-1, -1, 1).
"""

from __future__ import annotations

import logging
import math

import nibabel as nib
import numpy as np
import pytest

from radground.volume import nifti_labels_on_series, series_affine, series_to_nifti
from tasks.segment.base import SegmentationError, SeriesVolume

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    a, b = math.radians(yaw_deg), math.radians(pitch_deg)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return about_x @ about_z


_OBLIQUE = _rotation(25.0, 12.0)

# name: (row cosines, column cosines, (row spacing, column spacing), step between slices in LPS mm)
GEOMETRIES = {
    # supine axial, slices from the feet to the head (+z LPS is the head)
    "axial_feet_to_head": ((1, 0, 0), (0, 1, 0), (0.9, 0.9), (0, 0, 2.5)),
    "axial_head_to_feet": ((1, 0, 0), (0, 1, 0), (0.9, 0.9), (0, 0, -2.5)),
    # prone / flipped display: the image's left is the patient's left
    "axial_prone": ((-1, 0, 0), (0, -1, 0), (1.1, 1.1), (0, 0, 3.0)),
    "axial_non_square": ((1, 0, 0), (0, 1, 0), (0.7, 1.3), (0, 0, 2.0)),
    "coronal": ((1, 0, 0), (0, 0, -1), (0.8, 0.8), (0, -2.0, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1), (1.2, 0.9), (1.5, 0, 0)),
    "oblique": (tuple(_OBLIQUE[:, 0]), tuple(_OBLIQUE[:, 1]), (0.85, 1.05), tuple(2.2 * _OBLIQUE[:, 2])),
}


def make_volume(geometry: str, shape: tuple[int, int, int] = (6, 17, 13), modality: str = "CT",
                origin: tuple[float, float, float] = (-7.3, 4.9, 40.15)) -> SeriesVolume:
    row, col, spacing, step = GEOMETRIES[geometry]
    n_slices, height, width = shape
    positions = np.asarray(origin) + np.arange(n_slices)[:, None] * np.asarray(step, dtype=np.float64)
    values = (np.arange(n_slices * height * width).reshape(shape) - 500).astype(np.int16)  # unique per pixel
    if modality == "MR":
        values = (values + 500).astype(np.uint16)
    return SeriesVolume(image_ids=tuple(f"img{k}" for k in range(n_slices)), modality=modality, values=values,
                        orientation=(*row, *col), positions=positions, spacing=spacing)


def dicom_world_ras(volume: SeriesVolume) -> np.ndarray:
    """(S, H, W, 3) RAS mm of every pixel centre, from IPP, IOP and PixelSpacing only."""
    row_mm, col_mm = volume.spacing
    n_slices, height, width = volume.values.shape
    jj, ii = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")  # (H, W)
    lps = (volume.positions[:, None, None, :]
           + ii[None, :, :, None] * col_mm * volume.row_direction
           + jj[None, :, :, None] * row_mm * volume.column_direction)
    return lps * LPS_TO_RAS


def voxel_world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(*shape, 3) world coordinates of every voxel centre under an affine."""
    ijk = np.indices(shape).reshape(3, -1).astype(np.float64)
    return (affine[:3, :3] @ ijk + affine[:3, 3:]).T.reshape(*shape, 3)


# Cells of a skewed checkerboard in world space: asymmetric along every axis, so a flip, a
# permutation or an off-by-one slice changes labels. Offsets keep every pixel centre of these
# geometries well away from a cell boundary (asserted), so exact equality is well posed.
_PERIODS = np.array([6.1, 4.3, 5.7])
_OFFSETS = np.array([0.37, -0.21, 0.13])


def world_labels(ras: np.ndarray, periods: np.ndarray = _PERIODS) -> np.ndarray:
    cell = np.floor((ras + _OFFSETS) / periods)
    return (1 + np.mod(cell[..., 0] + 3 * cell[..., 1] + 7 * cell[..., 2], 117)).astype(np.uint8)


def boundary_distance(ras: np.ndarray, periods: np.ndarray = _PERIODS) -> np.ndarray:
    """Distance (mm) of each point to the nearest cell boundary of world_labels."""
    frac = np.mod((ras + _OFFSETS) / periods, 1.0)
    return (np.minimum(frac, 1 - frac) * periods).min(axis=-1)


def fake_totalsegmentator(input, output=None, **kwargs):  # "input": TotalSegmentator's own argument name
    """Labels from world coordinates, returned in canonical (RAS) voxel order like a reoriented result."""
    labels = world_labels(voxel_world(input.affine, input.shape))
    return nib.as_closest_canonical(nib.Nifti1Image(labels, input.affine))


def test_series_affine_by_hand() -> None:
    volume = SeriesVolume(image_ids=("a", "b", "c"), modality="CT", values=np.zeros((3, 4, 5), np.int16),
                          orientation=(1, 0, 0, 0, 1, 0), positions=np.array([[-100, -120, 50], [-100, -120, 52.5],
                                                                             [-100, -120, 55.0]]),
                          spacing=(0.8, 0.6))
    expected = np.array([[-0.6, 0, 0, 100], [0, -0.8, 0, 120], [0, 0, 2.5, 50], [0, 0, 0, 1]])
    np.testing.assert_allclose(series_affine(volume), expected, atol=1e-12)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_nifti_voxel_is_the_dicom_pixel(geometry: str) -> None:
    volume = make_volume(geometry)
    image = series_to_nifti(volume)
    data = np.asanyarray(image.dataobj)
    n_slices, height, width = volume.values.shape
    assert data.shape == (width, height, n_slices) and data.dtype == np.int16
    np.testing.assert_array_equal(data, volume.values.transpose(2, 1, 0))  # nifti[i, j, k] == values[k, j, i]
    expected = dicom_world_ras(volume).transpose(2, 1, 0, 3)  # (W, H, S, 3)
    np.testing.assert_allclose(voxel_world(image.affine, data.shape), expected, atol=1e-9)
    reloaded = nib.Nifti1Image.from_bytes(image.to_bytes())  # the header keeps the geometry (float32 sform)
    np.testing.assert_allclose(reloaded.affine, image.affine, atol=1e-4)
    assert reloaded.header.get_xyzt_units()[0] == "mm"


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_world_labels_land_on_the_dicom_grid(geometry: str) -> None:
    volume = make_volume(geometry)
    world = dicom_world_ras(volume)
    assert boundary_distance(world).min() > 1e-4  # the expectation is unambiguous
    returned = fake_totalsegmentator(series_to_nifti(volume))
    labels = nifti_labels_on_series(returned, volume)
    assert labels.shape == volume.values.shape
    np.testing.assert_array_equal(labels, world_labels(world))
    assert len(np.unique(labels)) > 4


@pytest.mark.parametrize("geometry", ["axial_head_to_feet", "axial_prone", "coronal", "oblique"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_in_any_voxel_order(geometry: str, seed: int) -> None:
    """A permuted/flipped copy (affine adjusted by hand), saved and reloaded, comes back exactly."""
    volume = make_volume(geometry)
    image = series_to_nifti(volume)
    labels = world_labels(voxel_world(image.affine, image.shape))
    rng = np.random.default_rng(seed)
    perm, flips = rng.permutation(3), rng.integers(0, 2, 3).astype(bool)
    data = labels.transpose(perm)
    index_map = np.zeros((4, 4))  # output voxel index -> input voxel index
    index_map[3, 3] = 1
    for out_axis, in_axis in enumerate(perm):
        if flips[out_axis]:
            data = np.flip(data, out_axis)
            index_map[in_axis, out_axis], index_map[in_axis, 3] = -1, labels.shape[in_axis] - 1
        else:
            index_map[in_axis, out_axis] = 1
    shuffled = nib.Nifti1Image(np.ascontiguousarray(data), image.affine @ index_map)
    shuffled = nib.Nifti1Image.from_bytes(shuffled.to_bytes())
    np.testing.assert_array_equal(nifti_labels_on_series(shuffled, volume), world_labels(dicom_world_ras(volume)))


@pytest.mark.parametrize(("geometry", "left_on_image_right"), [("axial_feet_to_head", True), ("axial_prone", False)])
def test_patient_left_and_right(geometry: str, left_on_image_right: bool) -> None:
    """LPS +x (RAS -x) is the patient's left: supine axial shows it on the image's right."""
    row, _, (_, col_mm), _ = GEOMETRIES[geometry]
    origin = -4.5 * col_mm * np.asarray(row, dtype=np.float64)  # x = 0 falls between columns 4 and 5
    volume = make_volume(geometry, shape=(3, 8, 10), origin=tuple(origin))

    def by_side(input, output=None, **kwargs):
        ras_x = voxel_world(input.affine, input.shape)[..., 0]
        return nib.as_closest_canonical(nib.Nifti1Image(np.where(ras_x < 0, 118, 119).astype(np.uint8),
                                                        input.affine))  # 118 lung_left, 119 lung_right

    labels = nifti_labels_on_series(by_side(series_to_nifti(volume)), volume)
    left, right = (118, 119) if left_on_image_right else (119, 118)
    assert (labels[:, :, 5:] == left).all() and (labels[:, :, :5] == right).all()


def test_dtypes() -> None:
    assert series_to_nifti(make_volume("axial_feet_to_head", modality="MR")).get_data_dtype() == np.uint16
    volume = make_volume("axial_feet_to_head")
    floats = SeriesVolume(volume.image_ids, "CT", volume.values.astype(np.float32) + 0.4, volume.orientation,
                          volume.positions, volume.spacing)
    assert series_to_nifti(floats).get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(series_to_nifti(floats).dataobj), volume.values.transpose(2, 1, 0))
    with pytest.raises(SegmentationError, match="modality 'US'"):
        series_to_nifti(SeriesVolume(volume.image_ids, "US", volume.values, volume.orientation, volume.positions,
                                     volume.spacing))


def test_single_slice() -> None:
    volume = make_volume("coronal", shape=(1, 17, 13))
    np.testing.assert_allclose(series_affine(volume)[:3, 2], [0, -1, 0])  # 1 mm along the LPS normal (0, 1, 0)
    labels = nifti_labels_on_series(fake_totalsegmentator(series_to_nifti(volume)), volume)
    np.testing.assert_array_equal(labels, world_labels(dicom_world_ras(volume)))


@pytest.mark.parametrize("geometry", ["axial_feet_to_head", "coronal", "oblique"])
def test_coarser_grid_is_resampled_nearest_neighbour(geometry: str, caplog: pytest.LogCaptureFixture) -> None:
    volume = make_volume(geometry, shape=(12, 40, 36), origin=(-15.0, -18.0, 3.0))
    world = dicom_world_ras(volume)  # (S, H, W, 3)
    periods = np.array([12.0, 11.0, 13.0])
    # An axis-aligned RAS grid with larger voxels, covering only part of the series.
    voxel = np.array([1.5, 1.9, 2.6])
    low = world.reshape(-1, 3).min(axis=0) + 4.0
    coarse_shape = tuple(int(n) for n in np.ceil((world.reshape(-1, 3).max(axis=0) - low) / voxel) - 2)
    coarse_affine = np.eye(4)
    coarse_affine[:3, :3] = np.diag(voxel)
    coarse_affine[:3, 3] = low
    coarse = world_labels(voxel_world(coarse_affine, coarse_shape), periods)
    with caplog.at_level(logging.INFO, logger="radground.volume"):
        labels = nifti_labels_on_series(nib.Nifti1Image(coarse, coarse_affine), volume)

    assert "resampling nearest-neighbour" in caplog.text
    assert labels.shape == volume.values.shape
    assert set(np.unique(labels)) <= set(np.unique(coarse)) | {0}  # nearest neighbour invents no label
    source = (world - low) / voxel  # coarse voxel coordinates of every series pixel
    half_diagonal = 0.5 * float(np.linalg.norm(voxel))
    inside = np.all((source >= 0) & (source <= np.array(coarse_shape) - 1), axis=-1)
    clear = inside & (boundary_distance(world, periods) > half_diagonal)
    assert clear.sum() > 1000
    np.testing.assert_array_equal(labels[clear], world_labels(world, periods)[clear])
    outside = np.any((source < -0.5 - 1e-6) | (source > np.array(coarse_shape) - 0.5 + 1e-6), axis=-1)
    assert outside.any() and (labels[outside] == 0).all()


def test_label_image_elsewhere_is_refused() -> None:
    volume = make_volume("axial_feet_to_head")
    far = np.eye(4)
    far[:3, 3] = (500.0, 500.0, 500.0)
    with pytest.raises(SegmentationError, match="does not overlap"):
        nifti_labels_on_series(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), far), volume)


def test_probability_maps_are_refused() -> None:
    volume = make_volume("axial_feet_to_head")
    image = series_to_nifti(volume)
    with pytest.raises(SegmentationError, match="non-integer"):
        nifti_labels_on_series(nib.Nifti1Image(np.full(image.shape, 0.5, np.float32), image.affine), volume)


def _with_positions(volume: SeriesVolume, positions: np.ndarray) -> SeriesVolume:
    return SeriesVolume(volume.image_ids, volume.modality, volume.values, volume.orientation, positions,
                        volume.spacing)


def test_gantry_tilt_is_refused() -> None:
    volume = make_volume("axial_feet_to_head")
    tilted = volume.positions + np.arange(len(volume.positions))[:, None] * np.array([0, 0.5, 0])  # ~11 degrees
    with pytest.raises(SegmentationError, match="gantry tilt"):
        series_affine(_with_positions(volume, tilted))


def test_uneven_spacing_is_refused() -> None:
    volume = make_volume("axial_feet_to_head")
    gappy = volume.positions.copy()
    gappy[3:] += np.array([0, 0, 2.5])  # one missing slice
    with pytest.raises(SegmentationError, match="non-uniform slice spacing"):
        series_affine(_with_positions(volume, gappy))
    with pytest.raises(SegmentationError, match="duplicate"):
        series_affine(_with_positions(volume, np.repeat(volume.positions[:1], len(volume.positions), axis=0)))


def test_rounded_positions_are_accepted() -> None:
    volume = make_volume("oblique")
    rounded = np.round(volume.positions, 3)  # DICOM decimal strings
    np.testing.assert_allclose(series_affine(_with_positions(volume, rounded)), series_affine(volume), atol=2e-3)
