"""Classical CT segmentation from Hounsfield units and geometry alone: no weights, CPU only.

What it finds (merged label space of radground.labels), axial CT only:
- body outline (internal; the label space has no body class): per slice the largest
  component above -500 HU after a ~3 mm opening (detaches table and blankets), holes filled.
  Where the patient is cut by the field of view, the image edges the body covers (>= 20 %)
  count as closed, so lungs cut by a zoomed FOV are still "inside".
- lung_left (118) / lung_right (119), the generic MR classes: lobes cannot be told apart by
  HU. Air (< -400 HU, smoothed) inside the body, in per-slice components. Rejected: pure gas
  (> 50 % of pixels below -950 HU: outside air, trachea, bowel gas, pneumothorax - aerated
  lung is air mixed with tissue and blood, about -900..-700 HU), pieces < 1 cm2, and midline
  tubes < 8 cm2 (trachea, main bronchi). A kept piece must belong to a 3D component (across
  slices) whose largest cross-section is >= 10 cm2 and which, on that slice, reaches
  posterior to the front of the vertebral body (lungs always fill the paravertebral gutters;
  bowel does not). The SIDE comes from the orientation: each pixel's patient x (LPS, +x =
  patient left) is computed from ImageOrientationPatient, relative to the midline (the
  vertebral body if found, else the body centre); prone or flipped series need no special case.
  A piece straddling the midline (bronchi, a merged anterior junction) is split pixel-wise.
- vertebrae (121, generic): dense bone (> 450 HU smoothed: cortex) closed and hole-filled
  (marrow), plus > 200 HU bone within 3 mm of it. Per slice the thickest bone piece (inscribed
  radius >= 6 mm) whose core is within 35 mm of the midline and posterior to the body centre
  (checked only where the FOV shows the whole body), not a skull (filled area <= 35 % of the
  body), clipped to 50 mm lateral of its core (attached rib heads). Levels (C1..S1) are not
  counted: a partial scan has no landmark to count from.
- aorta (52), contrast-enhanced only: a round (fill >= 0.6 of its box ellipse) 150-500 HU
  component of 15-40 mm diameter, outside bone, 0-60 mm anterior of the vertebral body and
  15 mm right to 50 mm left of its core; the one closest to the vertebral core wins.
What it cannot (documented, not claimed): ribs (thin bone lateral/anterior, no generic rib
class and no robust numbering), sternum, heart, liver, spleen, kidneys (soft-tissue contrast
overlaps; no test shows a rule working on both the synthetic drop and real CT), an unenhanced
aorta (blood ~40 HU like muscle), lungs with severe emphysema (parenchyma below -950 HU reads
as pure gas), osteoporotic vertebrae whose cortex stays below 450 HU, non-axial series
(the positional rules are axial; they get an all-zero mask), and MR (no HU: all zeros).
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

# In-plane connectivity only: the slice gap can be 20 mm, so per-slice work must not leak
# across slices; 3D steps use _FACES explicitly.
_PLANE = np.zeros((3, 3, 3), dtype=bool)
_PLANE[1] = True
_FACES = ndimage.generate_binary_structure(3, 1)
_PLANE_CROSS = _FACES & _PLANE


@dataclass(frozen=True)
class ClassicalSettings:
    """Thresholds in HU and mm; the defaults are textbook CT numbers, not fitted to a phantom."""

    body_hu: float = -500.0
    air_hu: float = -400.0
    gas_hu: float = -950.0  # pure gas reads below this; aerated lung above (emphysema: partly below)
    parenchyma_hu: float = -700.0  # upper end of clean lung parenchyma
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
    aorta_diameter_mm: tuple[float, float] = (15.0, 40.0)


class ClassicalBackend:
    """Lungs, vertebral column and contrast-enhanced aorta from HU thresholds and anatomy rules."""

    name = "classical"

    def __init__(self, settings: ClassicalSettings | None = None) -> None:
        self.settings = settings or ClassicalSettings()

    def segment(self, volume: SeriesVolume) -> np.ndarray:
        """(S, H, W) uint8 class ids; all zeros for MR and non-axial series."""
        started = time.perf_counter()
        mask = np.zeros(volume.values.shape, dtype=np.uint8)
        normal = np.cross(volume.row_direction, volume.column_direction)
        if volume.modality != "CT" or mask.size == 0 or abs(normal[2]) < 0.7:
            log.debug("classical: %s series, normal %s: nothing to find (CT axial only)", volume.modality, normal)
            return check_mask(volume, mask, self.name)
        _segment_ct(volume, self.settings, mask)
        found = {name: int((mask == cid).any(axis=(1, 2)).sum()) for name, cid in
                 (("lung_left", LUNG_LEFT), ("lung_right", LUNG_RIGHT), ("vertebrae", VERTEBRAE), ("aorta", AORTA))}
        log.info("classical: %d slices, slices per class %s, %.2f s", mask.shape[0], found,
                 time.perf_counter() - started)
        return check_mask(volume, mask, self.name)


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    out = np.zeros((1, 2 * r + 1, 2 * r + 1), dtype=bool)  # (1, k, k): in-plane only
    out[0] = xx**2 + yy**2 <= radius_px**2 + 0.5
    return out


def _slice_of(labels: np.ndarray, n: int) -> np.ndarray:
    """Slice index of each per-slice label 1..n (index 0 unused)."""
    z = np.zeros(n + 1, dtype=np.int64)
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None:
            z[k] = sl[0].start
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


def _label_max(values: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label 0..n: the maximum of values and the flat index of one pixel holding it (labelled pixels only)."""
    fg = np.flatnonzero(labels)
    lab, v = labels.ravel()[fg], values.ravel()[fg]
    top = np.full(n + 1, -np.inf)
    np.maximum.at(top, lab, v)
    hit = v == top[lab]
    ids, first = np.unique(lab[hit], return_index=True)
    where = np.zeros(n + 1, dtype=np.int64)
    where[ids] = fg[hit][first]
    return top, where


class _Stats:
    """Per-label pixel count, mean and extent of the patient-plane coordinates (one pass each)."""

    def __init__(self, labels: np.ndarray, n: int, px: np.ndarray, py: np.ndarray) -> None:
        flat = labels.ravel()
        self.count = np.bincount(flat, minlength=n + 1).astype(np.float64)
        safe = np.maximum(self.count, 1)
        x3, y3 = (np.broadcast_to(a, labels.shape).ravel() for a in (px, py))
        self.x = np.bincount(flat, weights=x3, minlength=n + 1) / safe
        self.y = np.bincount(flat, weights=y3, minlength=n + 1) / safe
        self.x_max, self.y_max = (_label_max(a, labels, n)[0] for a in (x3, y3))
        self.x_min, self.y_min = (-_label_max(-a, labels, n)[0] for a in (x3, y3))
        self.z = _slice_of(labels, n)


def _segment_ct(volume: SeriesVolume, cfg: ClassicalSettings, mask: np.ndarray) -> None:
    slices, height, width = volume.values.shape
    row_mm, col_mm = (float(s) if s and s > 0 else 1.0 for s in volume.spacing)
    px_mm = min(row_mm, col_mm)
    hu = volume.values.astype(np.float32)
    sigma = cfg.smooth_mm / np.array([row_mm, col_mm])
    smooth = ndimage.gaussian_filter(hu, sigma=(0.0, *sigma))
    # Patient-plane coordinates (mm) of each pixel from the orientation, relative to pixel
    # (0, 0): px grows towards patient LEFT, py towards POSTERIOR (LPS), whatever the in-plane
    # flip or rotation, so no rule below assumes where the patient lies in the image.
    i = np.arange(height, dtype=np.float64)[:, None] * row_mm
    j = np.arange(width, dtype=np.float64)[None, :] * col_mm
    r, c = volume.row_direction, volume.column_direction
    px, py = j * r[0] + i * c[0], j * r[1] + i * c[1]  # (H, W) each
    cell_cm2 = row_mm * col_mm / 100.0

    body, inside, cut = _body(smooth, cfg)
    b_count = np.maximum(body.sum(axis=(1, 2)), 1)
    body_x = (body * px).sum(axis=(1, 2)) / b_count  # (S,)
    body_y = (body * py).sum(axis=(1, 2)) / b_count
    inside_cm2 = inside.sum(axis=(1, 2)) * cell_cm2
    # Along which image axis patient x / y run decides which cut edges hide the midline / AP centre.
    lr_cut = cut[:, 2:].any(axis=1) if abs(r[0]) >= abs(c[0]) else cut[:, :2].any(axis=1)
    ap_cut = cut[:, :2].any(axis=1) if abs(r[0]) >= abs(c[0]) else cut[:, 2:].any(axis=1)
    # The image edge on the patient's posterior side (top, bottom, left, right: 0..3).
    back_edge = (1 if c[1] > 0 else 0) if abs(c[1]) >= abs(r[1]) else (3 if r[1] > 0 else 2)

    bone, spine, core = _vertebrae(smooth, inside, cfg, (row_mm, col_mm), px, py,
                                   body_x, body_y, inside_cm2, lr_cut, ap_cut)
    has_spine = ~np.isnan(core[:, 0])
    midline = np.where(has_spine, core[:, 0], np.nan)
    fallback = np.nanmedian(midline) if has_spine.any() else None
    midline = np.where(has_spine, midline, body_x if fallback is None else fallback)
    midline = np.where(~has_spine & ~lr_cut, body_x, midline)

    body_back = np.where(body, py[None], -np.inf).max(axis=(1, 2))  # most posterior body point (S,)
    lungs = _lungs(hu, smooth, inside, bone, spine, cfg, cell_cm2, px_mm, px, py, midline, core, has_spine, body_back,
                   ~cut[:, back_edge])
    mask[lungs > 0] = np.where(lungs[lungs > 0] == 1, LUNG_LEFT, LUNG_RIGHT)
    mask[spine] = VERTEBRAE
    mask[_aorta(smooth, inside, cfg, (row_mm, col_mm), px, py, core)] = AORTA


def _body(smooth: np.ndarray, cfg: ClassicalSettings) -> tuple[np.ndarray, ...]:
    """Body (S, H, W), body with holes filled (S, H, W), and which edges cut it (S, 4: top, bottom, left, right)."""
    slices = smooth.shape[0]
    labels, n = ndimage.label(smooth > cfg.body_hu, structure=_PLANE)
    body = np.zeros(smooth.shape, dtype=bool)
    if n:
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        best = _best_per_slice(_slice_of(labels, n), counts, counts > 0, slices)
        keep = np.zeros(n + 1, dtype=bool)
        keep[best[best > 0]] = True
        body = keep[labels]
    edges = (body[:, 0, :], body[:, -1, :], body[:, :, 0], body[:, :, -1])
    cut = np.stack([e.mean(axis=1) >= 0.2 for e in edges], axis=1)  # (S, 4)
    framed = body.copy()  # a field of view cutting the patient counts as closed there
    framed[cut[:, 0], 0, :] = True
    framed[cut[:, 1], -1, :] = True
    framed[cut[:, 2], :, 0] = True
    framed[cut[:, 3], :, -1] = True
    inside = ndimage.binary_fill_holes(framed, structure=_PLANE) | _hull(body)
    return body, inside, cut


def _hull(mask: np.ndarray, directions: int = 8) -> np.ndarray:
    """Per slice, a 2*directions-gon around the mask's convex hull (support lines every 180/directions deg).

    Lungs touching the skin (a breached outline) still lie within it; a mattress under a
    flat back does not.
    """
    slices, height, width = mask.shape
    i = np.arange(height, dtype=np.float32)[:, None]
    j = np.arange(width, dtype=np.float32)[None, :]
    hull = mask.any(axis=(1, 2))[:, None, None] & np.ones(mask.shape, dtype=bool)
    for theta in np.arange(directions) * np.pi / directions:
        proj = np.float32(np.cos(theta)) * i + np.float32(np.sin(theta)) * j  # (H, W)
        lo = np.where(mask, proj, np.inf).min(axis=(1, 2))[:, None, None]
        hi = np.where(mask, proj, -np.inf).max(axis=(1, 2))[:, None, None]
        hull &= (proj >= lo - 0.5) & (proj <= hi + 0.5)
    return hull


def _vertebrae(smooth, inside, cfg, spacing, px, py, body_x, body_y, inside_cm2, lr_cut, ap_cut):
    """All bone (S, H, W), the vertebral column (S, H, W) and its core per slice (S, 3: x, y, radius mm; NaN: none)."""
    slices = smooth.shape[0]
    cell_cm2 = spacing[0] * spacing[1] / 100.0
    core = np.full((slices, 3), np.nan)
    # Bone: > 200 HU pieces holding some cortex (> 450 HU): trabecular bone and its marrow
    # read 150-400 HU, like an enhanced vessel, which has no cortex.
    labels, n = ndimage.label((smooth > cfg.bone_hu) & inside, structure=_PLANE)
    dense = np.bincount(labels.ravel(), weights=(smooth > cfg.cortex_hu).ravel(), minlength=n + 1)
    dense[0] = 0
    bone = ndimage.binary_fill_holes((dense > 0)[labels], structure=_PLANE)
    labels, n = ndimage.label(bone, structure=_PLANE)
    if not n:
        return bone, np.zeros_like(bone), core
    # Inscribed radius per pixel, in-plane only: a huge z sampling keeps other slices out of reach.
    edt = ndimage.distance_transform_edt(bone, sampling=(1e6, *spacing))
    stats = _Stats(labels, n, px, py)
    radius, where = _label_max(edt, labels, n)
    _, ci, cj = np.unravel_index(where, labels.shape)
    cx, cy = px[ci, cj], py[ci, cj]
    z = stats.z
    # A head slice: the skull makes > 18 % of a whole (uncut) cross-section bone; a torso,
    # pelvis included, stays near 3-12 %. No vertebra is looked for there.
    skull = ~(lr_cut | ap_cut) & (bone.sum(axis=(1, 2)) * cell_cm2 > 0.18 * inside_cm2)
    ok = (radius >= cfg.min_vertebra_radius_mm) & ~skull[z]
    ok &= lr_cut[z] | (np.abs(cx - body_x[z]) <= cfg.spine_offset_mm)
    ok &= ap_cut[z] | (cy > body_y[z])  # posterior half of the body
    ok[0] = False
    best = _best_per_slice(z, radius, ok, slices)
    found = best > 0
    if found.sum() >= 3:  # the column is continuous: drop slices whose core jumps away
        bx, by = cx[best[found]], cy[best[found]]
        far = np.hypot(bx - np.median(bx), by - np.median(by)) > 40.0
        best[np.flatnonzero(found)[far]] = 0
        found = best > 0
    core[found] = np.stack([cx[best[found]], cy[best[found]], radius[best[found]]], axis=1)
    # The arch (pedicles, laminae, spinous process) is often a separate piece on a slice:
    # take bone pieces centred within 35 mm of the core laterally and up to 90 mm behind it.
    dx, dy = stats.x - core[z, 0], stats.y - core[z, 1]
    with np.errstate(invalid="ignore"):
        selected = (np.abs(dx) <= cfg.spine_offset_mm) & (dy >= 0.0) & (dy <= 90.0)
    selected[best[found]] = True
    selected[0] = False
    # Clip what joins above 200 HU: rib heads (beyond 50 mm either side of the core) and, in
    # front of the core, anything outside the vertebral body's ellipse (an enhanced aorta
    # resting on it): semi-axes r + 3 mm front to back and 1.6 r + 4 mm across (a lumbar body
    # is half again as wide as deep).
    cx3, cy3, cr3 = (np.where(found, core[:, k], 1.0)[:, None, None] for k in range(3))
    dx3, dy3 = px[None] - cx3, py[None] - cy3
    front = (dx3 / (1.6 * cr3 + 4.0)) ** 2 + (dy3 / (cr3 + 3.0)) ** 2 <= 1.0
    spine = selected[labels] & (np.abs(dx3) <= 50.0) & ((dy3 >= 0.0) | front)
    return bone, spine, core


def _lungs(hu, smooth, inside, bone, spine, cfg, cell_cm2, px_mm, px, py, midline, core, has_spine, body_back, body_ok):
    """(S, H, W) int8: 1 = patient left lung, 2 = patient right lung, 0 = neither."""
    # Aerated tissue, not pure gas. The partial-volume rim where pure gas meets tissue (skin
    # line, trachea and bowel walls) also reads -950..-400 HU: drop a 2.5 mm band around gas.
    # Unsmoothed HU for the lung itself: smoothing would erase lung slivers a few pixels wide.
    # The band drops lung slivers next to gas too; regrow them from the lung through pixels
    # of parenchyma density (a partial-volume rim is too mixed to form such a path).
    gas = ndimage.binary_dilation(smooth < cfg.gas_hu, structure=_disk(2.5 / px_mm))
    aerated = (hu < cfg.air_hu) & ~gas
    parenchyma = (hu >= cfg.gas_hu) & (hu < cfg.parenchyma_hu)
    aerated = ndimage.binary_propagation(aerated, structure=_PLANE_CROSS, mask=aerated | parenchyma)
    labels, n = ndimage.label(aerated, structure=_PLANE)
    sides = np.zeros(aerated.shape, dtype=np.int8)
    if not n:
        return sides
    flat = labels.ravel()
    stats = _Stats(labels, n, px, py)
    z = stats.z
    enclosed = np.bincount(flat, weights=inside.ravel(), minlength=n + 1) / np.maximum(stats.count, 1)
    area = stats.count * cell_cm2
    offset = stats.x - midline[z]
    # A lung piece is thick somewhere (a 3 mm disk fits): partial-volume rims along skin,
    # bowel or sinus walls and septated mastoid cells are not.
    thick = np.bincount(flat, weights=ndimage.binary_erosion(aerated, structure=_disk(3.0 / px_mm)).ravel(),
                        minlength=n + 1) > 0
    # Within the body's hull (a quarter suffices: a lung may bulge through the skin line of a
    # thin chest wall) and not at the back surface, where mattress and table foam lie.
    back = np.where(body_ok, body_back, np.inf)
    keep = (enclosed >= 0.25) & (stats.y <= back[z] - 20.0) & (area >= cfg.min_lung_piece_cm2) & thick
    keep &= ~((np.abs(offset) <= cfg.trachea_offset_mm) & (area < cfg.trachea_cm2))
    # Posterior reach: the posterior-most point must lie behind the vertebral body's front.
    front = np.where(has_spine, core[:, 1] - core[:, 2], -np.inf)
    reach = stats.y_max >= front[z]
    keep[0] = False
    # 3D: pieces join across slices; a component qualifies by its largest cross-section and
    # by posterior reach somewhere; then each piece of it must reach posterior on its own slice
    # or belong to a qualifying component (apex and base pieces are small and anterior).
    pieces = keep[labels]
    # Slices can be 5-20 mm apart and the lung base moves between them: pieces link across
    # neighbouring slices when they come within 5 mm in-plane, not only when they overlap.
    comp, m = ndimage.label(ndimage.binary_dilation(pieces, structure=_disk(5.0 / px_mm)), structure=_FACES)
    if not m:
        return sides
    piece_comp = np.zeros(n + 1, dtype=np.int64)
    piece_comp[flat[pieces.ravel()]] = comp.ravel()[pieces.ravel()]
    biggest = np.zeros(m + 1)
    np.maximum.at(biggest, piece_comp[keep], area[keep])
    reaches = np.zeros(m + 1, dtype=bool)
    np.logical_or.at(reaches, piece_comp[keep], reach[keep])
    keep &= (biggest[piece_comp] >= cfg.min_lung_cm2) & reaches[piece_comp]
    # Side: left where patient x exceeds the midline. Straddling pieces are split per pixel.
    left_px = (px[None] > midline[:, None, None]).ravel()
    left_frac = np.bincount(flat, weights=left_px, minlength=n + 1) / np.maximum(stats.count, 1)
    piece_side = np.where(left_frac >= 0.5, 1, 2).astype(np.int8)
    split = keep & (left_frac > 0.15) & (left_frac < 0.85)
    kept = keep[labels]
    sides[kept] = piece_side[labels[kept]]
    per_pixel = split[labels]
    sides[per_pixel] = np.where(left_px.reshape(sides.shape)[per_pixel], 1, 2)
    # Where lung thins to a sliver under a pixel wide (over the diaphragm dome, behind a rib)
    # only isolated pixels stay below -400 HU. Such fragments (pieces < 1 cm2, not near gas)
    # join a side when they lie in that side's lung on a neighbouring slice, or are reached
    # from its lung on this slice in hops of up to 5 mm, across non-vertebral bone.
    small = ((area < cfg.min_lung_piece_cm2) | ~thick) & (enclosed >= 0.25)
    small[0] = False
    fragments = small[labels]
    path = fragments | (bone & ~spine)
    hop = _disk(5.0 / px_mm)
    neighbours = np.array([1, 0, 1], dtype=bool)[:, None, None]  # (3, 1, 1): the slices either side
    for side in (1, 2):
        lung = sides == side
        seeds = lung | (fragments & ndimage.binary_dilation(lung, structure=neighbours))
        grown = ndimage.binary_propagation(seeds, structure=hop, mask=path | lung)
        sides[grown & fragments & (sides == 0)] = side
    return sides


def _aorta(smooth, inside, cfg, spacing, px, py, core):
    """(S, H, W) bool: the enhanced descending aorta, a round vessel next to the vertebral body."""
    lo, hi = cfg.contrast_hu
    px_mm = min(spacing)
    vessel = (smooth >= lo) & (smooth <= hi) & inside
    # Not bone: away from cortex and outside the vertebral body's inscribed disk (marrow reads
    # like contrast). An aorta touching the vertebra may have joined the spine mask: it is
    # found here all the same and its label wins where the two overlap.
    vessel &= ~ndimage.binary_dilation(smooth > cfg.cortex_hu, structure=_disk(1.0 / px_mm))
    cx, cy, cr = (np.nan_to_num(core[:, k], nan=-1e9)[:, None, None] for k in range(3))
    vessel &= np.hypot(px[None] - cx, py[None] - cy) > cr + 1.0
    # The aorta is the centre of an inscribed disk (a local maximum of the distance map) of
    # 15-40 mm diameter, anterior of the vertebral core and from 15 mm right to 50 mm left of
    # it; the nearest such centre to the core wins. Fitting a disk, not taking a connected
    # component, keeps it apart from a kidney, IVC or crus it touches at the same density.
    edt = ndimage.distance_transform_edt(vessel, sampling=(1e6, *spacing))
    size = max(3, int(round(9.0 / px_mm)) | 1)
    peak = edt == ndimage.maximum_filter(edt, size=(1, size, size))
    lo_r, hi_r = (d / 2.0 for d in cfg.aorta_diameter_mm)
    dx, ahead = px[None] - cx, cy - py[None]  # mm towards patient left / anterior of the core
    peak &= (edt >= lo_r) & (edt <= hi_r) & (dx >= -15.0) & (dx <= 50.0) & (ahead >= 0.0) & (ahead <= cr + 60.0)
    score = np.where(peak, -np.hypot(dx, ahead), -np.inf).reshape(len(core), -1)  # (S, H*W)
    best = score.argmax(axis=1)
    found = np.isfinite(score[np.arange(len(core)), best])
    bi, bj = np.unravel_index(best, px.shape)
    radius = edt.reshape(len(core), -1)[np.arange(len(core)), best]
    ax, ay = px[bi, bj][:, None, None], py[bi, bj][:, None, None]
    disk = np.hypot(px[None] - ax, py[None] - ay) <= (radius + 1.5)[:, None, None]
    return vessel & disk & found[:, None, None]
