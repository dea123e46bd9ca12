"""The one place that maps between a DICOM series and a NIfTI volume.

Conventions (every function here keeps them; tests/test_volume.py pins them):
- Voxel order: NIfTI voxel (i, j, k) is DICOM pixel (column i, row j) of slice k, i.e.
  ``nifti[i, j, k] == series.values[k, j, i]``; the NIfTI array is (W, H, S). i runs along the
  row direction (the first three ImageOrientationPatient cosines) in steps of the column
  spacing, j along the column direction (the last three) in steps of the row spacing, k from
  the series' first slice to its last.
- World space: DICOM patient coordinates are LPS (+x patient left, +y posterior, +z head);
  NIfTI's are RAS (+x patient right, +y anterior, +z head). The affine maps voxel indices to
  RAS mm, so x and y of every DICOM vector change sign.
- Slice axis: (last position - first position) / (S - 1). The stack may run head-to-feet or
  feet-to-head (or either way along any normal); the affine's handedness follows the data,
  which NIfTI allows. A single slice gets a 1 mm step along the normal (nothing else is known).
- Only stacks whose slices lie on one straight line along the normal, equally spaced, have
  an affine: gantry-tilted (sheared) and unevenly spaced series raise SegmentationError.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from nibabel.spatialimages import SpatialImage
from scipy import ndimage

from radground.errors import SegmentationError


@dataclass(frozen=True)
class SeriesVolume:
    """One series as the images table holds it, slices sorted along the normal."""

    image_ids: tuple[str, ...]  # (S,)
    modality: str  # "CT" | "MR"
    values: np.ndarray  # (S, H, W): CT in HU (int16), MR raw (uint16)
    orientation: tuple[float, ...]  # ImageOrientationPatient: row cosines (3) then column cosines (3)
    positions: np.ndarray  # (S, 3) ImagePositionPatient per slice, mm (LPS)
    spacing: tuple[float, float]  # (row spacing, column spacing), mm

    def __post_init__(self) -> None:
        if self.values.ndim != 3 or len(self.image_ids) != self.values.shape[0]:
            raise ValueError(f"values must be (S, H, W) with S = {len(self.image_ids)} image ids; "
                             f"got shape {self.values.shape}")

    @property
    def row_direction(self) -> np.ndarray:
        """Patient-space direction of increasing column index (along a row)."""
        return np.asarray(self.orientation[:3], dtype=np.float64)

    @property
    def column_direction(self) -> np.ndarray:
        """Patient-space direction of increasing row index (down a column)."""
        return np.asarray(self.orientation[3:], dtype=np.float64)


log = logging.getLogger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Geometry tolerance as a fraction of the smallest voxel size: slices may deviate this much
# from the ideal stack, and a label image whose grid lies this close to the series' grid is
# copied voxel for voxel (nearest-neighbour resampling would pick the very same voxels).
GRID_TOLERANCE = 0.1
_COSINE_TOLERANCE = 1e-3  # ImageOrientationPatient is often written with ~6 decimals
_NIFTI_DTYPES = {"CT": np.int16, "MR": np.uint16}


def series_affine(volume: SeriesVolume) -> np.ndarray:
    """4x4 affine from NIfTI voxel (column, row, slice) to RAS+ world mm (see module conventions)."""
    row_dir, col_dir, normal = _directions(volume)
    row_mm, col_mm = (float(s) for s in volume.spacing)
    if not (row_mm > 0 and col_mm > 0):
        raise SegmentationError(f"{_describe(volume)}: pixel spacing {volume.spacing} mm; expected two positive "
                                "values (row spacing, column spacing). Check the PixelSpacing of the source series.")
    positions = np.asarray(volume.positions, dtype=np.float64)
    if positions.shape != (volume.values.shape[0], 3):
        raise SegmentationError(f"{_describe(volume)}: positions have shape {positions.shape}; expected "
                                f"({volume.values.shape[0]}, 3), one ImagePositionPatient per slice.")
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_mm  # i: next column, one column spacing along the row direction
    lps[:3, 1] = col_dir * row_mm  # j: next row, one row spacing along the column direction
    lps[:3, 2] = _slice_step(volume, positions, normal, min(row_mm, col_mm))
    lps[:3, 3] = positions[0]  # centre of pixel (0, 0) of the first slice
    return _LPS_TO_RAS @ lps


def series_to_nifti(volume: SeriesVolume) -> nib.Nifti1Image:
    """The series as a NIfTI image: (W, H, S) array, int16 HU for CT, uint16 for MR, RAS affine."""
    affine = series_affine(volume)
    dtype = _NIFTI_DTYPES.get(volume.modality)
    if dtype is None:
        raise SegmentationError(f"{_describe(volume)}: modality {volume.modality!r}; expected one of "
                                f"{sorted(_NIFTI_DTYPES)}.")
    # (S, H, W) -> (W, H, S); the copy keeps the caller's array out of reach of in-place edits,
    # and the transposed C-order copy is Fortran-ordered, NIfTI's own layout.
    data = _to_dtype(np.asarray(volume.values), dtype).transpose(2, 1, 0)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    # Through the header, so image.affine keeps float64 (the header stores float32, as on disk).
    image.header.set_sform(affine, code="scanner")
    image.header.set_qform(affine, code="scanner")
    return image


def nifti_labels_on_series(image: SpatialImage, volume: SeriesVolume) -> np.ndarray:
    """A label image brought onto the series' pixel grid: (S, H, W) integer labels.

    The image may store its voxels in any order (a flip or permutation of the series grid,
    e.g. after ``nibabel.as_closest_canonical``): it is reoriented with nibabel.orientations
    and, when its grid then matches the series grid (same shape, every voxel centre within
    GRID_TOLERANCE of the smallest voxel size), copied voxel for voxel. A label image on any
    other grid (other shape, spacing, origin or rotation) is resampled nearest-neighbour
    (scipy.ndimage.map_coordinates, order=0) through the two affines; series voxels whose
    centre falls outside the label image get 0. Labels are never interpolated.
    """
    target = series_affine(volume)
    n_slices, height, width = volume.values.shape
    shape = (width, height, n_slices)
    if image.affine is None:
        raise SegmentationError(f"label image for {_describe(volume)} has no affine; a label image must carry "
                                "its voxel-to-world mapping (NIfTI sform/qform).")
    source = np.asarray(image.affine, dtype=np.float64)
    data = _label_array(np.asanyarray(image.dataobj), volume)

    xform = ornt_transform(io_orientation(source), io_orientation(target))
    reoriented = apply_orientation(data, xform)
    reoriented_affine = source @ inv_ornt_aff(xform, data.shape)
    tolerance = GRID_TOLERANCE * float(np.linalg.norm(target[:3, :3], axis=0).min())
    if reoriented.shape == shape and _grid_distance_mm(reoriented_affine, target, shape) <= tolerance:
        on_grid = reoriented
    else:
        log.info("label image grid %s (voxels %s mm) differs from the series grid %s (voxels %s mm); "
                 "resampling nearest-neighbour", data.shape, _voxel_mm(source), shape, _voxel_mm(target))
        on_grid = _resample_nearest(data, source, target, shape, volume)
    return np.ascontiguousarray(on_grid.transpose(2, 1, 0))  # (W, H, S) -> (S, H, W)


def _describe(volume: SeriesVolume) -> str:
    first = volume.image_ids[0] if volume.image_ids else "?"
    return f"{volume.modality} series of {len(volume.image_ids)} slices (first image {first})"


def _directions(volume: SeriesVolume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(volume.orientation) != 6:
        raise SegmentationError(f"{_describe(volume)}: ImageOrientationPatient has {len(volume.orientation)} "
                                "values; expected 6 (row cosines, then column cosines).")
    row_dir, col_dir = volume.row_direction, volume.column_direction
    norms = np.array([np.linalg.norm(row_dir), np.linalg.norm(col_dir)])
    if np.any(np.abs(norms - 1) > _COSINE_TOLERANCE) or abs(row_dir @ col_dir) > _COSINE_TOLERANCE:
        raise SegmentationError(f"{_describe(volume)}: ImageOrientationPatient {tuple(volume.orientation)} is not "
                                "two orthogonal unit vectors; the header is corrupt. Re-export the series.")
    row_dir, col_dir = row_dir / norms[0], col_dir / norms[1]
    normal = np.cross(row_dir, col_dir)
    return row_dir, col_dir, normal / np.linalg.norm(normal)


def _slice_step(volume: SeriesVolume, positions: np.ndarray, normal: np.ndarray, pixel_mm: float) -> np.ndarray:
    """(3,) LPS step from one slice to the next; refuses stacks that are not uniform along the normal."""
    n_slices = len(positions)
    if n_slices == 1:
        return normal.copy()
    span = positions[-1] - positions[0]
    step = span / (n_slices - 1)
    gap = abs(float(step @ normal))
    if gap < 1e-3:
        raise SegmentationError(f"{_describe(volume)}: first and last slice lie {gap * (n_slices - 1):.3g} mm "
                                "apart along the normal; expected a stack of distinct slices. Check for "
                                "duplicate instances in the series.")
    tolerance = GRID_TOLERANCE * min(pixel_mm, gap)
    drift = float(np.linalg.norm(span - (span @ normal) * normal))
    if drift > tolerance:
        raise SegmentationError(f"{_describe(volume)}: the slices drift {drift:.2f} mm in-plane from first to last "
                                f"(gantry tilt or sheared stack; tolerance {tolerance:.3f} mm); radground needs "
                                "slices stacked along the normal. Resample the series to an orthogonal grid "
                                "or leave it out.")
    ideal = positions[0] + np.arange(n_slices)[:, None] * step
    deviation = float(np.linalg.norm(positions - ideal, axis=1).max())
    if deviation > tolerance:
        gaps = np.abs(np.diff(positions, axis=0) @ normal)
        raise SegmentationError(f"{_describe(volume)}: non-uniform slice spacing (gaps {gaps.min():.3f} to "
                                f"{gaps.max():.3f} mm; a slice lies {deviation:.3f} mm off the uniform stack, "
                                f"tolerance {tolerance:.3f} mm). A volume needs equally spaced slices: look "
                                "for missing slices, or resample the series.")
    return step


def _to_dtype(values: np.ndarray, dtype: type[np.integer]) -> np.ndarray:
    """Values in dtype (a copy): floats rounded, everything clipped to the dtype's range."""
    info = np.iinfo(dtype)
    if np.issubdtype(values.dtype, np.integer) and np.can_cast(values.dtype, dtype):
        return values.astype(dtype, copy=True)
    source = np.rint(values) if np.issubdtype(values.dtype, np.floating) else values
    return np.clip(source, info.min, info.max).astype(dtype)


def _label_array(data: np.ndarray, volume: SeriesVolume) -> np.ndarray:
    """A 3D array of non-negative integer labels (a trailing singleton 4th axis is dropped)."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SegmentationError(f"label image for {_describe(volume)} has shape {data.shape}; expected a 3D "
                                "label volume (one integer class id per voxel).")
    if data.dtype == bool:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.floating):
        rounded = np.rint(data)
        if data.size and float(np.abs(data - rounded).max()) > 1e-3:
            raise SegmentationError(f"label image for {_describe(volume)} holds non-integer values; expected class "
                                    "ids. Masks must be labels (nearest-neighbour), not interpolated or "
                                    "probability maps.")
        data = rounded.astype(np.uint8 if (not data.size or rounded.max() <= 255) else np.int32)
    if not np.issubdtype(data.dtype, np.integer):
        raise SegmentationError(f"label image for {_describe(volume)} has dtype {data.dtype}; expected integers.")
    if data.size and int(data.min()) < 0:
        raise SegmentationError(f"label image for {_describe(volume)} holds negative class id {int(data.min())}; "
                                "expected 0 (background) or positive ids.")
    return data


def _grid_distance_mm(a: np.ndarray, b: np.ndarray, shape: tuple[int, int, int]) -> float:
    """Largest world distance between the same voxel under two affines (attained at a corner)."""
    corners = np.array([[*c, 1.0] for c in itertools.product(*[(0, n - 1) for n in shape])]).T  # (4, 8)
    return float(np.linalg.norm(((a - b) @ corners)[:3], axis=0).max())


def _voxel_mm(affine: np.ndarray) -> str:
    return "x".join(f"{v:.3g}" for v in np.linalg.norm(affine[:3, :3], axis=0))


def _resample_nearest(data: np.ndarray, source: np.ndarray, target: np.ndarray, shape: tuple[int, int, int],
                      volume: SeriesVolume) -> np.ndarray:
    """Nearest-neighbour labels of data (on the source affine) at every voxel centre of the target grid."""
    to_source = np.linalg.inv(source) @ target  # target voxel index -> source voxel index
    width, height, n_slices = shape
    ii, jj = np.meshgrid(np.arange(width), np.arange(height), indexing="ij")  # (W, H)
    plane = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)]).astype(np.float64)
    upper = np.array(data.shape, dtype=np.float64)[:, None] - 0.5
    out = np.zeros(shape, dtype=data.dtype)
    covered = 0
    for k in range(n_slices):  # slice by slice: coordinates of a whole volume would need GBs
        plane[2] = k
        coords = (to_source @ plane)[:3]  # (3, W*H) source voxel coordinates
        inside = np.all((coords > -0.5) & (coords < upper), axis=0)
        if not inside.any():
            continue
        covered += int(inside.sum())
        # mode="nearest" only serves the half-voxel rim; points beyond the image are zeroed below.
        values = ndimage.map_coordinates(data, coords, order=0, mode="nearest")
        out[:, :, k] = np.where(inside, values, 0).reshape(width, height)
    if covered == 0:
        raise SegmentationError(f"label image (shape {data.shape}) does not overlap {_describe(volume)} at all; "
                                "it belongs to another series or its affine is wrong.")
    return out
