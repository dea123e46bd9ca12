"""An analytic torso phantom rendered onto any DICOM pixel grid.

Anatomy is defined in patient coordinates (DICOM LPS, millimetres: +x = patient
left, +y = posterior, +z = superior) as stacks of ellipses whose size follows a
profile along z, so one patient's organs are a consistent 3D shape and every
slice is rendered directly on its own DICOM grid (no resampling, so ground-truth
boxes are exact). Sizes and positions vary per patient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Phantom tissue codes. Lesions are separate codes so they can carry their own
# intensity, but they count towards their parent organ's ground-truth box.
AIR, SOFT, FAT, LUNG_R, LUNG_L, HEART, AORTA, LIVER, SPLEEN = range(9)
KIDNEY_R, KIDNEY_L, VERT_CORTEX, VERT_MARROW, CANAL, RIB, LIVER_LESION, KIDNEY_CYST = range(9, 17)

#: Ground-truth organ name (TotalSegmentator-style English) -> tissue codes that form it.
ORGAN_CODES: dict[str, tuple[int, ...]] = {
    "body": tuple(range(1, 17)),
    "lung_right": (LUNG_R,),
    "lung_left": (LUNG_L,),
    "heart": (HEART,),
    "aorta": (AORTA,),
    "liver": (LIVER, LIVER_LESION),
    "spleen": (SPLEEN,),
    "kidney_right": (KIDNEY_R, KIDNEY_CYST),
    "kidney_left": (KIDNEY_L,),
    "vertebrae": (VERT_CORTEX, VERT_MARROW),
    "ribs": (RIB,),
    "liver_lesion": (LIVER_LESION,),
    "kidney_cyst": (KIDNEY_CYST,),
}

# Mean CT numbers (HU) per tissue code; the aorta depends on contrast.
_CT_HU = {
    AIR: -1000, SOFT: 40, FAT: -100, LUNG_R: -860, LUNG_L: -860, HEART: 45, AORTA: 40,
    LIVER: 60, SPLEEN: 50, KIDNEY_R: 35, KIDNEY_L: 35, VERT_CORTEX: 750, VERT_MARROW: 250,
    CANAL: 15, RIB: 650, LIVER_LESION: 15, KIDNEY_CYST: 5,
}
_CT_NOISE_HU = {AIR: 4.0, LUNG_R: 35.0, LUNG_L: 35.0}  # others: patient noise sigma
# T1-weighted-like MR intensities (arbitrary scanner units).
_MR_SIGNAL = {
    AIR: 5, SOFT: 320, FAT: 900, LUNG_R: 30, LUNG_L: 30, HEART: 260, AORTA: 120,
    LIVER: 480, SPLEEN: 380, KIDNEY_R: 360, KIDNEY_L: 360, VERT_CORTEX: 60, VERT_MARROW: 600,
    CANAL: 150, RIB: 60, LIVER_LESION: 190, KIDNEY_CYST: 90,
}


@dataclass(frozen=True)
class Blob:
    """An organ as a stack of ellipses between two z fractions of the torso."""

    code: int
    t_start: float  # 0 = top of the scanned torso, 1 = bottom
    t_end: float
    cx: float  # centre and semi-axes in mm, relative to the body centre
    cy: float
    ax: float
    ay: float
    min_scale: float = 0.35  # cross-section never shrinks below this at the ends
    widest_at: float = 0.5  # where in [t_start, t_end] the cross-section is largest


@dataclass(frozen=True)
class Sphere:
    """A lesion: its true diameter is what the report states."""

    code: int
    x: float  # absolute patient coordinates, mm
    y: float
    z: float
    radius: float


@dataclass(frozen=True)
class Anatomy:
    """One patient's phantom: body ellipse, organs, lesions, scan extent."""

    center_x: float
    center_y: float
    body_ax: float
    body_ay: float
    fat_mm: float
    z_top: float
    length: float
    blobs: tuple[Blob, ...]
    vertebra_radius: float
    spheres: tuple[Sphere, ...] = field(default=())
    contrast: bool = False
    noise_hu: float = 12.0

    def z_at(self, t: float) -> float:
        """Patient z (mm) at torso fraction t (0 = top)."""
        return self.z_top - t * self.length

    def t_at(self, z: float) -> float:
        return (self.z_top - z) / self.length


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy: sizes and positions vary, the layout stays anatomical."""
    a = float(rng.uniform(140, 175))  # body semi-axis left-right
    b = float(rng.uniform(95, 125))  # body semi-axis antero-posterior

    def j(scale: float = 1.0) -> float:  # positional jitter in mm
        return float(rng.normal(0.0, 4.0 * scale))

    def s() -> float:  # size jitter
        return float(rng.uniform(0.88, 1.12))

    lung = s()
    right_kidney_shift = float(rng.uniform(0.02, 0.06))  # the right kidney sits lower
    blobs = (
        Blob(LUNG_R, 0.0, 0.52, -0.47 * a + j(), 0.05 * b + j(), 0.36 * a * lung, 0.72 * b * lung,
             min_scale=0.3, widest_at=0.8),
        Blob(LUNG_L, 0.0, 0.56, 0.50 * a + j(), 0.05 * b + j(), 0.32 * a * lung, 0.72 * b * lung,
             min_scale=0.3, widest_at=0.8),
        Blob(LIVER, 0.45, 0.82, -0.36 * a + j(), -0.02 * b + j(), 0.50 * a * s(), 0.66 * b * s(),
             min_scale=0.4, widest_at=0.3),
        Blob(SPLEEN, 0.50, 0.70, 0.56 * a + j(), 0.30 * b + j(), 0.16 * a * s(), 0.26 * b * s()),
        Blob(KIDNEY_L, 0.66, 0.92, 0.38 * a + j(), 0.45 * b + j(), 0.15 * a * s(), 0.26 * b * s()),
        Blob(KIDNEY_R, 0.66 + right_kidney_shift, 0.92 + right_kidney_shift, -0.38 * a + j(),
             0.45 * b + j(), 0.15 * a * s(), 0.26 * b * s()),
        Blob(HEART, 0.28, 0.52, 0.12 * a + j(), -0.30 * b + j(), 0.32 * a * s(), 0.38 * b * s(),
             min_scale=0.45),
        Blob(AORTA, 0.0, 1.0, 0.10 * a + j(0.5), 0.36 * b + j(0.5), 1.0, 1.0, min_scale=1.0),
    )
    return Anatomy(
        center_x=float(rng.uniform(-15, 15)),
        center_y=float(rng.uniform(-20, 20)),
        body_ax=a,
        body_ay=b,
        fat_mm=float(rng.uniform(8, 25)),
        z_top=float(rng.uniform(120, 220)),
        length=float(rng.uniform(300, 360)),
        blobs=blobs,
        vertebra_radius=float(rng.uniform(15, 19)),
        contrast=bool(rng.random() < 0.6),
        noise_hu=float(rng.uniform(8, 16)),
    )


def aorta_radius(anatomy: Anatomy) -> float:
    # Stored as a unit ellipse in the blob table; the real radius scales with the body.
    return 0.075 * anatomy.body_ay + 4.0


def blob_center_z(anatomy: Anatomy, code: int) -> tuple[float, float, float, float, float]:
    """(x, y, z, ax, ay) of an organ at its widest cross-section, absolute coordinates."""
    blob = next(b for b in anatomy.blobs if b.code == code)
    t = blob.t_start + blob.widest_at * (blob.t_end - blob.t_start)
    return (anatomy.center_x + blob.cx, anatomy.center_y + blob.cy, anatomy.z_at(t), blob.ax, blob.ay)


def _profile(blob: Blob, t: float) -> float:
    """Cross-section scale of a blob at torso fraction t (0 outside its extent)."""
    if not blob.t_start <= t <= blob.t_end:
        return 0.0
    peak = blob.t_start + blob.widest_at * (blob.t_end - blob.t_start)
    half = max(peak - blob.t_start, blob.t_end - peak) + 1e-6
    ellipsoid = math.sqrt(max(0.0, 1.0 - ((t - peak) / half) ** 2))
    return blob.min_scale + (1.0 - blob.min_scale) * ellipsoid


def patient_coordinates(
    position: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, spacing: tuple[float, float],
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient x, y, z (mm) of every pixel centre, per DICOM PS3.3 C.7.6.2.1.1.

    ``row_dir`` is the direction along a row (increasing column index), ``col_dir`` the
    direction down a column (increasing row index); spacing is (row spacing, column spacing).
    Returns three (rows, cols) arrays.
    """
    rows, cols = shape
    i = np.arange(rows, dtype=np.float64)[:, None] * spacing[0]  # (R, 1) mm down the column
    j = np.arange(cols, dtype=np.float64)[None, :] * spacing[1]  # (1, C) mm along the row
    xyz = [position[k] + j * row_dir[k] + i * col_dir[k] for k in range(3)]
    return xyz[0], xyz[1], xyz[2]


def render_labels(anatomy: Anatomy, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Tissue code per pixel for an axial slice at height z; x, y are pixel-centre coordinates."""
    dx = x - anatomy.center_x  # (R, C)
    dy = y - anatomy.center_y
    labels = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=np.uint8)
    t = anatomy.t_at(z)
    if not 0.0 <= t <= 1.0:
        return labels

    def ellipse(cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
        return ((dx - cx) / ax) ** 2 + ((dy - cy) / ay) ** 2 <= 1.0

    labels[ellipse(0, 0, anatomy.body_ax, anatomy.body_ay)] = FAT
    inner_ax, inner_ay = anatomy.body_ax - anatomy.fat_mm, anatomy.body_ay - anatomy.fat_mm
    labels[ellipse(0, 0, inner_ax, inner_ay)] = SOFT

    for blob in anatomy.blobs:
        scale = _profile(blob, t)
        if scale <= 0:
            continue
        if blob.code == AORTA:
            r = aorta_radius(anatomy)
            labels[ellipse(blob.cx, blob.cy, r, r)] = AORTA
        else:
            labels[ellipse(blob.cx, blob.cy, blob.ax * scale, blob.ay * scale)] = blob.code

    # Spine: vertebral body (cortex ring + marrow), canal behind it, posterior arch.
    r = anatomy.vertebra_radius
    vy = 0.62 * anatomy.body_ay
    labels[ellipse(0, vy, r, r)] = VERT_CORTEX
    labels[ellipse(0, vy, r - 3.0, r - 3.0)] = VERT_MARROW
    canal_y = vy + r + 7.0
    labels[ellipse(0, canal_y + 6.0, 14.0, 10.0)] = VERT_CORTEX  # arch around the canal
    labels[ellipse(0, canal_y, 7.0, 7.0)] = CANAL

    # Ribs in the chest: small circles just inside the fat layer, anterior centre spared.
    if t <= 0.62:
        tilt = 0.25 * t  # ribs slope, so their angular position drifts along z
        for angle in np.deg2rad([25, 50, 75, 105, 130, 155, 205, 230, 310, 335]) + tilt:
            rx = 0.9 * inner_ax * math.cos(angle)
            ry = -0.9 * inner_ay * math.sin(angle)
            labels[ellipse(rx, ry, 5.0, 5.0)] = RIB

    for sphere in anatomy.spheres:
        dz = z - sphere.z
        if abs(dz) < sphere.radius:
            rr = math.sqrt(sphere.radius**2 - dz**2)
            labels[((x - sphere.x) ** 2 + (y - sphere.y) ** 2) <= rr**2] = sphere.code
    return labels


def mean_hu_table(contrast: bool) -> np.ndarray:
    """Mean HU per tissue code (index = code); i.v. contrast enhances vessels and organs."""
    mean = np.array([_CT_HU[c] for c in range(17)], dtype=np.float32)
    if contrast:
        mean[AORTA] = 220.0
        mean[HEART] = 190.0  # blood pool
        mean[KIDNEY_R] = mean[KIDNEY_L] = 150.0
        mean[LIVER] = 95.0
        mean[SPLEEN] = 100.0
    return mean


def ct_hounsfield(anatomy: Anatomy, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CT numbers in HU (int16) with tissue-dependent Gaussian noise."""
    mean = mean_hu_table(anatomy.contrast)
    sigma = np.full(17, anatomy.noise_hu, dtype=np.float32)
    for code, value in _CT_NOISE_HU.items():
        sigma[code] = value
    hu = mean[labels] + sigma[labels] * rng.standard_normal(labels.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def mr_signal(labels: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """T1-like MR intensities (uint16) with a smooth coil bias field and noise."""
    mean = np.array([_MR_SIGNAL[c] for c in range(17)], dtype=np.float32)
    bias = 1.0 + 0.15 * np.tanh((x - x.mean()) / 200.0)  # receive-coil shading left-right
    signal = mean[labels] * bias + 18.0 * rng.standard_normal(labels.shape).astype(np.float32)
    return np.clip(np.rint(np.abs(signal)), 0, 4095).astype(np.uint16)


def organ_boxes(labels: np.ndarray) -> dict[str, list[int]]:
    """Per organ present: [col_min, row_min, col_max, row_max] in pixels, inclusive."""
    boxes: dict[str, list[int]] = {}
    for organ, codes in ORGAN_CODES.items():
        mask = np.isin(labels, codes)
        if not mask.any():
            continue
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        boxes[organ] = [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])]
    return boxes
