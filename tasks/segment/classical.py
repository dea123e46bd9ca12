"""Classical CT segmentation from Hounsfield units and geometry alone: no weights, CPU, numpy/scipy.

Finds on axial CT, per slice (vectorised), with 3D links across slices where they help:
- lung_left (118) / lung_right (119), the generic MR classes (lobes are not separable by HU):
  aerated tissue (< -400 HU) that is not pure gas (smoothed < -950 HU, plus its 2.5 mm
  partial-volume rim: outside air, trachea, bowel gas, sinuses). A seed piece is thick (a 3 mm
  disk fits), >= 90 % inside the body, not at the back surface (mattress, table foam), not a
  small midline tube (trachea < 8 cm2), and in a 3D component (pieces within 5 mm on
  neighbouring slices) that reaches 5 cm2 and, where a vertebra was found, extends behind the
  vertebral body's front (lungs fill the paravertebral gutters; bowel does not). Thin, small
  or partly outside pieces (diaphragm dome, behind a rib, a bulge through a thin chest wall)
  join a lung within 5 mm on the slice or covering them on a neighbouring slice. The SIDE
  comes from ImageOrientationPatient only: every pixel's patient x (LPS, + = patient left)
  against the midline (vertebral core, else body centre), so prone or flipped series need no
  special case; a piece straddling the midline is split per pixel.
- vertebrae (121, generic): > 200 HU pieces holding cortex (> 450 HU), holes filled; per slice
  the thickest (inscribed radius >= 6 mm), near the midline and in the posterior half where
  the FOV shows the whole body, not on a head slice (bone > 18 % of the section), continuous
  across slices; plus arch pieces up to 90 mm behind; clipped 50 mm either side (rib heads)
  and, in front, to the vertebral body's ellipse (an aorta resting on it). Levels (C1..S1) are
  not counted: a partial scan has no landmark to count from.
- aorta (52), i.v. contrast only: the inscribed disk (12-40 mm) of 130-500 HU non-bone tissue
  nearest the vertebral core, anterior of it, 15 mm right to 50 mm left. A fitted disk, not a
  component, stays apart from a touching kidney or IVC of the same density.
- body outline (body_outline; no class in the label space): per slice the largest component
  above -500 HU, holes filled, OR its convex hull; edges the body covers (>= 20 %) count as
  closed, since a zoomed FOV cuts the patient.

Cannot, so never claims: ribs (no generic rib class; numbering needs the whole cage), sternum,
heart, liver, spleen, kidneys (soft-tissue HU overlap; no rule shown to work on both the
synthetic drop and real CT), an unenhanced aorta (blood ~40 HU, like muscle), the aortic arch
(not round in axial slices). Weak spots: emphysema below -950 HU (holes in the lung mask),
osteoporotic vertebrae whose cortex stays below 450 HU, a thoracic aorta wider than the
vertebral body (the core may jump to it), stool-gas mixtures behind the vertebral front on
slices without lung. Non-axial series (the positional rules are axial) and MR (no HU) get
all zeros. Memory: a few float32 and bool copies of the body's bounding box.

Speed (~35 slices per CPU-second at 512x512, 3.7x the plain version): work on boxes (the body's,
a mask's, the aorta's search window per slice), disk morphology as row-wise running maxima,
hole filling and propagation as one labelling, convex-hull supports from the rows' end pixels.
Each gives exactly what scipy's plain operation on the whole image gives (the tests pin that),
so the masks are the same bit for bit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from radground.labels import label_map
from tasks.segment.base import SeriesVolume, check_mask

log = logging.getLogger(__name__)

_LABELS = label_map()
LUNG_LEFT = _LABELS.by_name("lung_left").id  # 118
LUNG_RIGHT = _LABELS.by_name("lung_right").id  # 119
VERTEBRAE = _LABELS.by_name("vertebrae").id  # 121
AORTA = _LABELS.by_name("aorta").id  # 52

# Per-slice work must not leak across slices (they can be 20 mm apart): in-plane structures;
# 3D steps use _FACES explicitly.
_PLANE = np.zeros((3, 3, 3), dtype=bool)
_PLANE[1] = True
_FACES = ndimage.generate_binary_structure(3, 1)
_PLANE_CROSS = _FACES & _PLANE


@dataclass(frozen=True)
class ClassicalSettings:
    """Thresholds in HU (textbook CT numbers) and sizes in mm / cm2 (anatomical rules of thumb)."""

    body_hu: float = -500.0
    air_hu: float = -400.0
    gas_hu: float = -950.0  # pure gas below; aerated lung above (emphysema partly below)
    parenchyma_hu: float = -700.0  # clean lung parenchyma lies in gas_hu..parenchyma_hu
    bone_hu: float = 200.0
    cortex_hu: float = 450.0
    contrast_hu: tuple[float, float] = (130.0, 500.0)
    smooth_mm: float = 1.0
    min_lung_piece_cm2: float = 1.0
    min_lung_cm2: float = 5.0
    trachea_cm2: float = 8.0
    trachea_offset_mm: float = 25.0
    min_vertebra_radius_mm: float = 6.0
    spine_offset_mm: float = 35.0
    aorta_diameter_mm: tuple[float, float] = (12.0, 40.0)


@dataclass(frozen=True)
class _Grid:
    """Patient-plane coordinates of the pixels, from the orientation alone."""

    px: np.ndarray  # (H, W) mm towards patient LEFT, relative to pixel (0, 0)
    py: np.ndarray  # (H, W) mm towards patient POSTERIOR
    spacing: tuple[float, float]  # (row, column) mm

    @property
    def px_mm(self) -> float:
        return min(self.spacing)

    @property
    def cell_cm2(self) -> float:
        return self.spacing[0] * self.spacing[1] / 100.0

    def distance(self, mask: np.ndarray, edge_is_outside: bool = False) -> np.ndarray:
        """(S, H, W) float32 in-plane distance (mm) from each True pixel to the nearest False one,
        slice by slice (a 3D transform holds four int32 copies of the volume); with
        edge_is_outside the image edge counts as False; an all-True slice reads +inf."""
        out = np.zeros(mask.shape, dtype=np.float32)
        for k, plane in enumerate(mask):
            if plane.any():
                out[k] = _plane_distance(plane, self.spacing, edge_is_outside)
        return out


class ClassicalBackend:
    """Lungs, vertebral column and contrast-enhanced aorta from HU thresholds and anatomy rules."""

    name = "classical"

    def __init__(self, settings: ClassicalSettings | None = None) -> None:
        self.settings = settings or ClassicalSettings()

    def segment(self, volume: SeriesVolume) -> np.ndarray:
        """(S, H, W) uint8 class ids; all zeros for MR and non-axial series."""
        started = time.perf_counter()
        mask = np.zeros(volume.values.shape, dtype=np.uint8)
        if not _axial_ct(volume):
            log.debug("classical: %s series with orientation %s: nothing to find (axial CT only)",
                      volume.modality, volume.orientation)
            return check_mask(volume, mask, self.name)
        _segment_ct(volume, self.settings, mask)
        found = {name: int((mask == cid).any(axis=(1, 2)).sum()) for name, cid in
                 (("lung_left", LUNG_LEFT), ("lung_right", LUNG_RIGHT), ("vertebrae", VERTEBRAE), ("aorta", AORTA))}
        log.info("classical: %d slices, slices with %s, %.2f s", mask.shape[0], found, time.perf_counter() - started)
        return check_mask(volume, mask, self.name)


def body_outline(volume: SeriesVolume, settings: ClassicalSettings | None = None) -> np.ndarray:
    """(S, H, W) bool: the body with holes (lungs, gas) filled and its hull; all False unless axial CT.

    The label space has no body class; this is the backend's own notion of "inside", for QC.
    """
    if not _axial_ct(volume):
        return np.zeros(volume.values.shape, dtype=bool)
    cfg = settings or ClassicalSettings()
    return _body(_smoothed(volume, cfg)[1], cfg)[1]  # the threshold is exact everywhere


def _plane_distance(plane: np.ndarray, spacing: tuple[float, float], edge_is_outside: bool) -> np.ndarray:
    """distance_transform_edt of one (H, W) plane, computed on its True pixels' box plus a one-pixel
    False ring (speed: the box is often a small part of the plane). Exact: a False pixel outside
    the ring is never nearer than the ring pixel it projects onto. +inf on an all-True plane."""
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    r0, r1, c0, c1 = max(rows[0] - 1, 0), rows[-1] + 2, max(cols[0] - 1, 0), cols[-1] + 2
    crop = plane[r0:r1, c0:c1]
    # Where the box meets the image edge, the edge is False only when asked for.
    pad = int(edge_is_outside)
    before = (pad * (r0 == 0), pad * (c0 == 0))
    after = (pad * (r1 >= plane.shape[0]), pad * (c1 >= plane.shape[1]))
    crop = np.pad(crop, ((before[0], after[0]), (before[1], after[1])))
    out = np.zeros(plane.shape, dtype=np.float32)
    if crop.all():
        out[r0:r1, c0:c1] = np.inf
    else:
        edt = ndimage.distance_transform_edt(crop, sampling=spacing)
        out[r0:r1, c0:c1] = edt[before[0]:edt.shape[0] - after[0], before[1]:edt.shape[1] - after[1]]
    return out


def _axial_ct(volume: SeriesVolume) -> bool:
    normal = np.cross(volume.row_direction, volume.column_direction)
    return volume.modality == "CT" and volume.values.size > 0 and abs(normal[2]) >= 0.7


def _smoothed(volume: SeriesVolume, cfg: ClassicalSettings,
              everywhere: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice]]:
    """HU as float32 and smoothed in-plane by a cfg.smooth_mm Gaussian, both (S, H, W); the in-plane
    box where the smoothed values are exact (the whole plane with everywhere).

    Speed: smoothed only where it is read. A pixel whose kernel sees nothing above cfg.body_hu
    smooths to <= body_hu (a weighted mean), so the body lies within the box of hu > body_hu grown
    by the kernel's reach, and usually all that _segment_ct reads within 16 more pixels: exact
    values there (computed with one more reach of context), body_hu (not body) beyond."""
    spacing = np.array([float(s) if s and s > 0 else 1.0 for s in volume.spacing])
    hu = volume.values.astype(np.float32)
    sigma = cfg.smooth_mm / spacing
    tissue = hu > cfg.body_hu
    if everywhere or not tissue.any():
        return hu, ndimage.gaussian_filter(hu, sigma=(0.0, *sigma)), (slice(0, hu.shape[1]), slice(0, hu.shape[2]))
    smooth = np.full(hu.shape, cfg.body_hu, dtype=np.float32)
    reach = int(max(4.0 * sigma.max() + 0.5, 1))  # gaussian_filter's default truncate=4.0
    exact = _box(tissue, pad=reach + 17)
    wide = tuple(slice(max(s.start - reach, 0), s.stop + reach) for s in exact)
    part = ndimage.gaussian_filter(hu[:, wide[0], wide[1]], sigma=(0.0, *sigma))
    inner = tuple(slice(e.start - w.start, e.stop - w.start) for e, w in zip(exact, wide, strict=True))
    smooth[:, exact[0], exact[1]] = part[:, inner[0], inner[1]]
    return hu, smooth, exact


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx**2 + yy**2 <= max(radius_px, 1.0) ** 2 + 0.5)[None]  # (1, k, k): in-plane only


def _dilate_disk(mask: np.ndarray, radius_px: float, outside: bool = False) -> np.ndarray:
    """binary_dilation(mask, structure=_disk(radius_px)), with pixels beyond the image counting as
    ``outside``. Speed: the disk is a stack of centred rows, so this is one running-max filter per
    row width plus a shifted OR per row: O(pixels x rows) instead of O(pixels x disk area)."""
    disk = _disk(radius_px)[0]
    half = disk.shape[0] // 2
    flat = np.ascontiguousarray(mask).view(np.uint8)
    widened: dict[int, np.ndarray] = {}
    out = np.zeros(mask.shape, dtype=bool)
    height = mask.shape[1]
    for dy in range(-half, half + 1):
        width = int(disk[dy + half].sum())  # the disk's row dy: centred, odd, possibly empty
        if not width or abs(dy) >= height:  # an empty row, or one that misses the image
            out[:] |= bool(width) and outside
            continue
        if width not in widened:
            widened[width] = ndimage.maximum_filter1d(flat, width, axis=2, mode="constant",
                                                      cval=int(outside)).view(bool)
        # out[:, i] |= row-widened mask[:, i + dy] where row i + dy exists
        out[:, max(-dy, 0):height - max(dy, 0)] |= widened[width][:, max(dy, 0):height + min(dy, 0)]
        if outside:  # rows i + dy beyond the image
            out[:, :max(-dy, 0)] = True
            out[:, height - max(dy, 0):] = True
    return out


def _erode_disk(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """binary_erosion(mask, structure=_disk(radius_px)): beyond the image counts as False. Worked on
    the mask's box: everything outside it is False, as beyond the image."""
    out = np.zeros_like(mask)
    if mask.any():
        box = (slice(None), *_box(mask, pad=0))
        out[box] = ~_dilate_disk(~mask[box], radius_px, outside=True)
    return out


def _dilate_disk_boxed(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """_dilate_disk(mask, radius_px) worked on the mask's box grown by the disk's radius (nothing
    beyond it can be reached)."""
    out = np.zeros_like(mask)
    if mask.any():
        box = (slice(None), *_box(mask, pad=_disk(radius_px).shape[1] // 2))
        out[box] = _dilate_disk(mask[box], radius_px)
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """binary_fill_holes(mask, structure=_PLANE) in one labelling (its iterated dilation is ~10x slower):
    background pieces (8-connected in-plane) touching no image edge are holes."""
    labels, n = ndimage.label(~mask, structure=_PLANE)
    hole = np.ones(n + 1, dtype=bool)  # label 0: the mask itself
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        hole[edge] = False
    hole[0] = True
    return hole[labels]


def _reconstruct(seeds: np.ndarray, mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """binary_propagation(seeds, structure, mask) for seeds within mask and a connectivity that
    ndimage.label takes: the pieces of mask that hold a seed, in one labelling."""
    labels, n = ndimage.label(mask, structure=structure)
    hit = np.zeros(n + 1, dtype=bool)
    hit[labels[seeds]] = True
    hit[0] = False
    return hit[labels]


def _slice_of(labels: np.ndarray, n: int) -> np.ndarray:
    """Slice index of each per-slice label 1..n (index 0 unused). ndimage.label numbers pieces in
    raster order, so slice k holds the labels above the previous slices' maximum."""
    top = np.maximum.accumulate(labels.reshape(len(labels), -1).max(axis=1)) if labels.size else np.zeros(0)
    z = np.searchsorted(top, np.arange(n + 1), side="left").astype(np.int64)
    z[0] = 0
    return z


def _best_per_slice(z: np.ndarray, score: np.ndarray, valid: np.ndarray, slices: int) -> np.ndarray:
    """Per slice the label (1..n) with the highest score among valid ones; 0 where none."""
    best = np.zeros(slices, dtype=np.int64)
    ids = np.flatnonzero(valid[1:]) + 1
    if ids.size:
        ids = ids[np.lexsort((score[ids], z[ids]))]  # by slice, then score ascending
        last = np.r_[z[ids][1:] != z[ids][:-1], True]
        best[z[ids][last]] = ids[last]
    return best


def _group_max(keys: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per key 0..n-1 the maximum of values (-inf where none); sort + reduceat (ufunc.at is slow)."""
    out = np.full(n, -np.inf)
    if keys.size:
        order = np.argsort(keys, kind="stable")
        k, v = keys[order], values[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        out[k[starts]] = np.maximum.reduceat(v, starts)
    return out


def _label_max(values: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label 0..n: the maximum of values and the flat index of a pixel holding it (labelled pixels only)."""
    fg = np.flatnonzero(labels)
    lab, v = labels.ravel()[fg], values.ravel()[fg]
    top = _group_max(lab, v, n + 1)
    hit = v == top[lab]
    ids, first = np.unique(lab[hit], return_index=True)
    where = np.zeros(n + 1, dtype=np.int64)
    where[ids] = fg[hit][first]
    return top, where


class _Stats:
    """Per-label pixel count, slice, mean patient x/y and posterior-most y (labelled pixels only)."""

    def __init__(self, labels: np.ndarray, n: int, grid: _Grid) -> None:
        fg = np.flatnonzero(labels)
        lab = labels.ravel()[fg]
        self._fg, self._lab = fg, lab
        in_plane = fg % grid.px.size
        xs, ys = grid.px.ravel()[in_plane], grid.py.ravel()[in_plane]
        self.count = np.bincount(lab, minlength=n + 1).astype(np.float64)
        self.count[0] = labels.size - fg.size
        self.x = np.bincount(lab, weights=xs, minlength=n + 1) / np.maximum(self.count, 1)
        self.y = np.bincount(lab, weights=ys, minlength=n + 1) / np.maximum(self.count, 1)
        self.y_max = _group_max(lab, ys, n + 1)
        self.z = _slice_of(labels, n)

    def mean(self, labels: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Per label 1..n the mean of values over its pixels (labels: those the stats were built on); 0 for 0."""
        sums = np.bincount(self._lab, weights=values.ravel()[self._fg], minlength=len(self.count))
        return sums / np.maximum(self.count, 1)


def _segment_ct(volume: SeriesVolume, cfg: ClassicalSettings, mask: np.ndarray) -> None:
    spacing = tuple(float(s) if s and s > 0 else 1.0 for s in volume.spacing)
    hu_full, smooth_full, exact = _smoothed(volume, cfg)
    body_full, inside_full, cut = _body(smooth_full, cfg)
    if not body_full.any():
        return
    # Everything else happens inside the body's bounding box (+ 16 px), which saves half the work.
    rows, cols = np.flatnonzero(inside_full.any(axis=(0, 2))), np.flatnonzero(inside_full.any(axis=(0, 1)))
    box = (slice(None), slice(max(rows[0] - 16, 0), rows[-1] + 17), slice(max(cols[0] - 16, 0), cols[-1] + 17))
    if not all(e.start <= b.start and min(b.stop, n) <= e.stop
               for e, b, n in zip(exact, box[1:], hu_full.shape[1:], strict=True)):
        hu_full, smooth_full, _ = _smoothed(volume, cfg, everywhere=True)  # a cut FOV's frame widened the box
    hu, smooth, body, inside = hu_full[box], smooth_full[box], body_full[box], inside_full[box]
    i = np.arange(hu.shape[1], dtype=np.float64)[:, None] * spacing[0]
    j = np.arange(hu.shape[2], dtype=np.float64)[None, :] * spacing[1]
    r, c = volume.row_direction, volume.column_direction
    grid = _Grid(px=(j * r[0] + i * c[0]).astype(np.float32), py=(j * r[1] + i * c[1]).astype(np.float32),
                 spacing=spacing)

    body_x, body_y, body_back = _body_geometry(body, grid)  # (S,) each
    # Which cut edges hide the left-right / front-back extent depends on the axis patient x runs along.
    x_on_rows = abs(r[0]) >= abs(c[0])
    lr_cut = cut[:, 2:].any(axis=1) if x_on_rows else cut[:, :2].any(axis=1)
    ap_cut = cut[:, :2].any(axis=1) if x_on_rows else cut[:, 2:].any(axis=1)
    back_edge = (1 if c[1] > 0 else 0) if abs(c[1]) >= abs(r[1]) else (3 if r[1] > 0 else 2)  # top/bottom/left/right

    bone, spine, core = _vertebrae(smooth, inside, cfg, grid, body_x, body_y, lr_cut, ap_cut)
    has_spine = ~np.isnan(core[:, 0])
    midline = body_x.copy()  # patient x of the midline per slice
    if has_spine.any():
        midline[lr_cut] = np.median(core[has_spine, 0])
        midline[has_spine] = core[has_spine, 0]
    back = np.where(cut[:, back_edge], np.inf, body_back)  # unknown where the FOV cuts the back

    sides = _lungs(hu, smooth, inside, bone & ~spine, cfg, grid, midline, core, back)
    out = np.zeros(hu.shape, dtype=np.uint8)
    out[sides == 1] = LUNG_LEFT
    out[sides == 2] = LUNG_RIGHT
    out[spine] = VERTEBRAE
    out[_aorta(smooth, inside, cfg, grid, core)] = AORTA
    mask[box] = out


def _body_geometry(body: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slice the body's mean patient x and y (0 without body) and its posterior-most y (-inf)."""
    x, y, back = np.zeros(len(body)), np.zeros(len(body)), np.full(len(body), -np.inf)
    px, py = grid.px.ravel(), grid.py.ravel()
    for k, plane in enumerate(body):  # per slice: no volume-sized index arithmetic
        fg = np.flatnonzero(plane)
        if fg.size:
            one_bin = np.zeros(fg.size, dtype=np.intp)  # bincount sums in pixel order (bit-stable)
            x[k] = np.bincount(one_bin, weights=px[fg])[0] / fg.size
            y[k] = np.bincount(one_bin, weights=py[fg])[0] / fg.size
            back[k] = py[fg].max()
    return x, y, back


def _body(smooth: np.ndarray, cfg: ClassicalSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body and inside (holes filled OR hull), both (S, H, W); edges cutting the body (S, 4: top/bottom/left/right)."""
    tissue = smooth > cfg.body_hu
    body = np.zeros_like(tissue)
    if tissue.any():  # labelled on its box (the same pieces, numbered in the same order)
        box = (slice(None), *_box(tissue, pad=0))
        labels, n = ndimage.label(tissue[box], structure=_PLANE)
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        best = _best_per_slice(_slice_of(labels, n), counts, counts > 0, smooth.shape[0])
        keep = np.zeros(n + 1, dtype=bool)
        keep[best[best > 0]] = True
        body[box] = keep[labels]
    edges = (body[:, 0, :], body[:, -1, :], body[:, :, 0], body[:, :, -1])
    cut = np.stack([e.mean(axis=1) >= 0.2 for e in edges], axis=1)  # (S, 4)
    framed = body.copy()  # where the field of view cuts the patient, the edge closes the outline
    framed[cut[:, 0], 0, :] = True
    framed[cut[:, 1], -1, :] = True
    framed[cut[:, 2], :, 0] = True
    framed[cut[:, 3], :, -1] = True
    inside = np.zeros_like(body)
    if body.any():
        # Holes and hull lie within framed's box; a False ring around it keeps background that
        # touches the crop's edge connected to the image's edge.
        box = (slice(None), *_box(framed, pad=1))
        inside[box] = _fill_holes(framed[box]) | _hull(body, box)
    return body, inside, cut


def _box(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    """In-plane (rows, cols) slices of the mask's bounding box over all slices, plus pad pixels, clipped."""
    rows, cols = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
    height, width = mask.shape[1:]
    return (slice(max(rows[0] - pad, 0), min(rows[-1] + pad + 1, height)),
            slice(max(cols[0] - pad, 0), min(cols[-1] + pad + 1, width)))


def _hull(mask: np.ndarray, box: tuple[slice, slice, slice], directions: int = 8) -> np.ndarray:
    """Per slice a 2*directions-gon around the mask's convex hull, over box (which holds the mask):
    a lung bulging through a thin chest wall is still within it, a mattress under a flat back is not."""
    i = np.arange(mask.shape[1], dtype=np.float32)[:, None][box[1]]
    j = np.arange(mask.shape[2], dtype=np.float32)[None, :][:, box[2]]
    # A linear function's maximum over a row of pixels lies at one of its ends: the rows' first and
    # last pixels have the mask's support (the float64 projections equal the all-pixel ones).
    z, fi = np.nonzero(mask.any(axis=2))
    first = mask.argmax(axis=2)[z, fi]
    last = mask.shape[2] - 1 - mask[:, :, ::-1].argmax(axis=2)[z, fi]
    z, fi, fj = np.r_[z, z], np.r_[fi, fi], np.r_[first, last]
    hull = np.broadcast_to(mask.any(axis=(1, 2))[:, None, None], (len(mask), i.size, j.size)).copy()
    for theta in np.arange(directions) * np.pi / directions:
        cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
        proj = cos * fi + sin * fj  # support of the mask's pixels along this direction
        hi = _group_max(z, proj, len(mask))[:, None, None]
        lo = -_group_max(z, -proj, len(mask))[:, None, None]
        plane = cos * i + sin * j  # (H, W)
        hull &= (plane >= lo - 0.5) & (plane <= hi + 0.5)
    return hull


def _vertebrae(smooth, inside, cfg, grid, body_x, body_y, lr_cut, ap_cut):
    """All bone (S, H, W), the vertebral column (S, H, W), its core per slice (S, 3: x, y, radius mm; NaN: none)."""
    slices = smooth.shape[0]
    core = np.full((slices, 3), np.nan)
    # Bone: > 200 HU pieces holding some cortex (> 450 HU). Trabecular bone reads 150-400 HU
    # like an enhanced vessel, which has no cortex.
    labels, n = ndimage.label((smooth > cfg.bone_hu) & inside, structure=_PLANE)
    dense = np.bincount(labels[smooth > cfg.cortex_hu], minlength=n + 1)  # cortex pixels per piece
    dense[0] = 0
    bone = _fill_holes((dense > 0)[labels])
    labels, n = ndimage.label(bone, structure=_PLANE)
    if not n:
        return bone, bone.copy(), core
    stats = _Stats(labels, n, grid)
    radius, where = _label_max(grid.distance(bone, edge_is_outside=True), labels, n)  # inscribed radius, mm
    _, ci, cj = np.unravel_index(where, labels.shape)
    cx, cy, z = grid.px[ci, cj], grid.py[ci, cj], stats.z
    # A head slice: the skull makes > 18 % of a whole (uncut) section bone; a torso, pelvis
    # included, stays near 3-12 %. No vertebra is looked for there.
    inside_cm2 = inside.sum(axis=(1, 2)) * grid.cell_cm2
    skull = ~(lr_cut | ap_cut) & (bone.sum(axis=(1, 2)) * grid.cell_cm2 > 0.18 * inside_cm2)
    ok = (radius >= cfg.min_vertebra_radius_mm) & ~skull[z]
    ok &= lr_cut[z] | (np.abs(cx - body_x[z]) <= cfg.spine_offset_mm)
    ok &= ap_cut[z] | (cy > body_y[z])  # posterior half of the body
    ok[0] = False
    best = _best_per_slice(z, radius, ok, slices)
    found = best > 0
    if found.sum() >= 3:  # the column is continuous: drop slices whose core jumps away
        far = np.hypot(cx[best[found]] - np.median(cx[best[found]]), cy[best[found]] - np.median(cy[best[found]]))
        best[np.flatnonzero(found)[far > 40.0]] = 0
        found = best > 0
    core[found] = np.stack([cx[best[found]], cy[best[found]], radius[best[found]]], axis=1)
    # The arch (pedicles, laminae, spinous process) is often a piece of its own on a slice:
    # take pieces centred within 35 mm of the core laterally and up to 90 mm behind it.
    with np.errstate(invalid="ignore"):
        dx, dy = stats.x - core[z, 0], stats.y - core[z, 1]
        selected = (np.abs(dx) <= cfg.spine_offset_mm) & (dy >= 0.0) & (dy <= 90.0)
    selected[best[found]] = True
    selected[0] = False
    # Clip what joins above 200 HU: rib heads (beyond 50 mm either side) and, in front of the
    # core, anything outside the vertebral body's ellipse (an aorta resting on it): semi-axes
    # r + 3 mm front to back, 1.6 r + 4 mm across (a lumbar body is half again as wide as deep).
    # (Computed at the selected pixels only: the same float32 arithmetic, a fraction of the pixels.)
    spine = selected[labels]
    z, i, j = np.nonzero(spine)
    cx3, cy3, cr3 = (np.where(found, core[:, k], 1.0).astype(np.float32)[z] for k in range(3))
    dx3, dy3 = grid.px[i, j] - cx3, grid.py[i, j] - cy3
    front = (dx3 / (1.6 * cr3 + 4.0)) ** 2 + (dy3 / (cr3 + 3.0)) ** 2 <= 1.0
    spine[z, i, j] = (np.abs(dx3) <= 50.0) & ((dy3 >= 0.0) | front)
    return bone, spine, core


def _lungs(hu, smooth, inside, bridges, cfg, grid, midline, core, back):
    """(S, H, W) int8: 1 = patient left lung, 2 = patient right lung, 0 = neither."""
    # Unsmoothed HU: smoothing would erase lung slivers a few pixels wide. The partial-volume
    # rim where pure gas meets tissue (skin, trachea, bowel) also reads -950..-400 HU, so a
    # 2.5 mm band around gas goes; lung cut off by it regrows through parenchyma-density
    # pixels (a rim mixes gas and tissue too unevenly to form such a path).
    gas = _dilate_disk_boxed(smooth < cfg.gas_hu, 2.5 / grid.px_mm)
    aerated = (hu < cfg.air_hu) & ~gas
    parenchyma = (hu >= cfg.gas_hu) & (hu < cfg.parenchyma_hu)
    aerated = _reconstruct(aerated, aerated | parenchyma, _PLANE_CROSS)
    labels, n = ndimage.label(aerated, structure=_PLANE)
    sides = np.zeros(aerated.shape, dtype=np.int8)
    if not n:
        return sides
    stats = _Stats(labels, n, grid)
    z, area = stats.z, stats.count * grid.cell_cm2
    enclosure = stats.mean(labels, inside)
    thick = stats.mean(labels, _erode_disk(aerated, 3.0 / grid.px_mm)) > 0
    trachea = (np.abs(stats.x - midline[z]) <= cfg.trachea_offset_mm) & (area < cfg.trachea_cm2)
    not_back = stats.y <= back[z] - 20.0
    keep = (enclosure >= 0.9) & thick & ~trachea & (area >= cfg.min_lung_piece_cm2) & not_back
    keep[0] = False
    # 3D: pieces link across neighbouring slices within 5 mm in-plane (slices can be 20 mm
    # apart and the lung base moves between them). A component counts if it reaches 5 cm2 on
    # some slice and extends behind the vertebral body's front somewhere.
    front = np.where(np.isnan(core[:, 0]), -np.inf, core[:, 1] - core[:, 2])
    pieces = keep[labels]
    comp, m = ndimage.label(_dilate_disk_boxed(pieces, 5.0 / grid.px_mm), structure=_FACES)
    piece_comp = np.zeros(n + 1, dtype=np.int64)
    piece_comp[labels[pieces]] = comp[pieces]
    biggest = _group_max(piece_comp[keep], area[keep], m + 1)
    reaches = _group_max(piece_comp[keep], (stats.y_max >= front[z])[keep].astype(float), m + 1) > 0
    keep &= (biggest[piece_comp] >= cfg.min_lung_cm2) & reaches[piece_comp]
    # Side from patient x: a piece goes to its majority side; one straddling the midline
    # (both lungs joined at the anterior junction or through bronchi) is split per pixel.
    left = grid.px[None] > midline[:, None, None]
    left_frac = stats.mean(labels, left)
    kept = keep[labels]
    sides[kept] = np.where(left_frac >= 0.5, 1, 2).astype(np.int8)[labels[kept]]
    split = (keep & (left_frac > 0.15) & (left_frac < 0.85))[labels]
    sides[split] = np.where(left[split], 1, 2)
    # Where lung thins under a pixel (diaphragm dome, behind a rib) only slivers and isolated
    # pixels stay below -400 HU, and a lung may bulge through a thin chest wall. Such pieces
    # (thin, small, or only partly inside the body) join a side whose lung covers them on a
    # neighbouring slice, or that reaches them on this slice in hops of up to 5 mm, across ribs.
    small = (enclosure >= 0.25) & not_back & ((area < cfg.min_lung_piece_cm2) | ~thick | (enclosure < 0.9))
    small[0] = False
    fragments = small[labels]
    # The hops are in-plane: only slices holding a fragment can change.
    todo = np.flatnonzero(fragments.any(axis=(1, 2)))
    if not todo.size:
        return sides
    hop = _disk(5.0 / grid.px_mm)
    for side in (1, 2):
        lung = sides == side
        above_or_below = np.zeros_like(lung)  # a lung pixel on the slice before or after
        above_or_below[1:] |= lung[:-1]
        above_or_below[:-1] |= lung[1:]
        seeds = (lung | (fragments & above_or_below))[todo]
        grown = ndimage.binary_propagation(seeds, structure=hop, mask=(fragments | bridges | lung)[todo])
        sub = sides[todo]
        sub[grown & fragments[todo] & (sub == 0)] = side
        sides[todo] = sub
    return sides


def _aorta(smooth, inside, cfg, grid, core):
    """(S, H, W) bool: the enhanced descending aorta, a round vessel beside the vertebral body."""
    out = np.zeros(smooth.shape, dtype=bool)
    size = max(3, int(round(9.0 / grid.px_mm)) | 1)  # the peak filter's width, pixels
    # Speed: each slice is searched in a crop around the window beside its core. Its margin holds
    # every pixel a window pixel's result depends on: the peak filter's reach, then the nearest
    # non-vessel pixel of any distance that can matter (a radius within the range, plus the
    # filter's reach), then the final disk; so the crop gives the same result as the whole slice.
    hi_mm = cfg.aorta_diameter_mm[1] / 2.0 + 1.5 + 2 * (size // 2) * max(grid.spacing)
    margin = size // 2 + int(np.ceil(hi_mm / min(grid.spacing))) + 1
    for k in np.flatnonzero(~np.isnan(core[:, 0])):
        cx, cy, cr = (np.float32(v) for v in core[k])
        dx, ahead = grid.px - cx, cy - grid.py  # mm towards patient left / anterior of the core
        window = (dx >= -15.0) & (dx <= 50.0) & (ahead >= 0.0) & (ahead <= cr + 60.0)
        if window.any():
            crop = tuple(slice(max(s.start - margin, 0), s.stop + margin) for s in _box(window[None], pad=0))
            out[k][crop] = _aorta_in(smooth[k], inside[k][crop], crop, cfg, grid, (cx, cy, cr), size)
    return out


def _aorta_in(smooth, inside, crop, cfg, grid, core, size):
    """The aorta of one slice within crop ((rows, cols) slices of it): see _aorta."""
    cx, cy, cr = core
    px, py = grid.px[crop], grid.py[crop]
    vessel = (smooth[crop] >= cfg.contrast_hu[0]) & (smooth[crop] <= cfg.contrast_hu[1]) & inside
    # Not bone: away from cortex and outside the vertebral body's inscribed disk (marrow reads
    # like contrast). An aorta that joined the spine mask is found all the same; its label wins.
    # (The dilation sees the cortex up to one disk radius beyond the crop, as on the whole slice.)
    disk = _disk(1.0 / grid.px_mm)
    reach = disk.shape[1] // 2
    wide = tuple(slice(max(s.start - reach, 0), s.stop + reach) for s in crop)
    cortex = ndimage.binary_dilation(smooth[wide] > cfg.cortex_hu, structure=disk[0])
    top, left = crop[0].start - wide[0].start, crop[1].start - wide[1].start
    vessel &= ~cortex[top:top + vessel.shape[0], left:left + vessel.shape[1]]
    dx, ahead = px - cx, cy - py  # mm towards patient left / anterior of the core
    vessel &= np.hypot(dx, ahead) > cr + 1.0
    # Centres of inscribed disks (local maxima of the distance map) in the search window; the
    # one nearest the vertebral core wins.
    edt = (ndimage.distance_transform_edt(vessel, sampling=grid.spacing).astype(np.float32)
           if not vessel.all() else np.full(vessel.shape, np.inf, dtype=np.float32))
    lo_r, hi_r = (d / 2.0 for d in cfg.aorta_diameter_mm)
    peak = (edt == ndimage.maximum_filter(edt, size=size)) & (edt >= lo_r) & (edt <= hi_r)
    peak &= (dx >= -15.0) & (dx <= 50.0) & (ahead >= 0.0) & (ahead <= cr + 60.0)
    score = np.where(peak, -np.hypot(dx, ahead), -np.inf)
    best = np.unravel_index(score.argmax(), score.shape)
    if not np.isfinite(score[best]):
        return np.zeros(vessel.shape, dtype=bool)
    radius = edt[best]
    disk = np.hypot(px - px[best], py - py[best]) <= radius + 1.5
    return vessel & disk
