"""The classical (HU + geometry) backend against the synthetic drop's truth boxes and real CT.

Expectations come from the drop's truth sidecar, from plain HU thresholds computed here, or
from looking at pydicom's bundled images; never from the code under test. Left/right is
checked in patient coordinates computed here from ImageOrientationPatient.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from radground.synth.drop import generate_drop
from tasks.segment.base import SegmentationBackend, SeriesVolume, check_mask
from tasks.segment.classical import AORTA, LUNG_LEFT, LUNG_RIGHT, VERTEBRAE, ClassicalBackend, body_outline

CLASSES = {"lung_left": LUNG_LEFT, "lung_right": LUNG_RIGHT, "vertebrae": VERTEBRAE, "aorta": AORTA}
BACKEND = ClassicalBackend()


# ---- helpers ---------------------------------------------------------------------------------

def read_series(paths: list[Path]) -> tuple[SeriesVolume, list[int]]:
    """SeriesVolume in HU from DICOM files, sorted along the slice normal; also the sort order."""
    datasets = [pydicom.dcmread(p) for p in paths]
    orientation = tuple(float(v) for v in datasets[0].ImageOrientationPatient)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = [int(k) for k in np.argsort(positions @ normal)]
    hu = np.stack([datasets[k].pixel_array * float(datasets[k].get("RescaleSlope", 1))
                   + float(datasets[k].get("RescaleIntercept", 0)) for k in order])
    return SeriesVolume(
        image_ids=tuple(str(datasets[k].SOPInstanceUID) for k in order), modality=str(datasets[0].Modality),
        values=np.rint(hu).astype(np.int16), orientation=orientation, positions=positions[order],
        spacing=tuple(float(v) for v in datasets[0].PixelSpacing),
    ), order


def box_of(plane: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])]


def box_iou(a: list[int] | None, b: list[int] | None) -> float:
    """IoU of inclusive pixel boxes [col_min, row_min, col_max, row_max]; 0 when one is missing."""
    if a is None or b is None:
        return 0.0
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(w, 0) * max(h, 0)
    area = lambda q: (q[2] - q[0] + 1) * (q[3] - q[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def iou_summary(ious: dict[str, list[float]]) -> str:
    """One line per class: how many claimed slices and the IoU distribution."""
    return "; ".join(f"{name}: n={len(v)} min={min(v):.3f} median={float(np.median(v)):.3f}"
                     for name, v in ious.items() if v)


def patient_x(volume: SeriesVolume) -> np.ndarray:
    """(S, H, W) patient x in mm (LPS: + is patient left) of every pixel, per DICOM C.7.6.2.1.1."""
    rows, cols = volume.values.shape[1:]
    i = np.arange(rows)[:, None] * volume.spacing[0]
    j = np.arange(cols)[None, :] * volume.spacing[1]
    r, c = volume.row_direction, volume.column_direction
    return volume.positions[:, 0, None, None] + (j * r[0] + i * c[0])[None]


def flip_in_plane(volume: SeriesVolume) -> SeriesVolume:
    """The same patient stored rotated by 180 degrees in-plane, as a prone-style series is."""
    rows, cols = volume.values.shape[1:]
    r, c = volume.row_direction, volume.column_direction
    far = volume.positions + (cols - 1) * volume.spacing[1] * r + (rows - 1) * volume.spacing[0] * c
    return SeriesVolume(volume.image_ids, volume.modality, volume.values[:, ::-1, ::-1].copy(),
                        (*(-r), *(-c)), far, volume.spacing)


def flip_box(box: list[int], rows: int, cols: int) -> list[int]:
    return [cols - 1 - box[2], rows - 1 - box[3], cols - 1 - box[0], rows - 1 - box[1]]


def segment(volume: SeriesVolume) -> np.ndarray:
    mask = BACKEND.segment(volume)
    assert mask.dtype == np.uint8
    return check_mask(volume, mask, BACKEND.name)


# ---- the synthetic drop ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def drop(tmp_path_factory):
    """Seed 3, 4 patients: four CT axial series (one prone), three MR series, planted bad files."""
    out = tmp_path_factory.mktemp("classical") / "d"
    result = generate_drop(out, patients=4, seed=3)
    truth = json.loads(result.truth_path.read_text(encoding="utf-8"))
    bad = {item["path"] for item in truth["bad_files"]}
    series = []
    for patient in truth["patients"]:
        for study in patient["studies"]:
            for se in study["series"]:
                if se["kind"] != "axial":
                    continue
                files = [f for f in se["files"] if f["path"] not in bad]
                volume, order = read_series([out / f["path"] for f in files])
                series.append((se, volume, [files[k] for k in order]))
    return series


@pytest.fixture(scope="module")
def ct_results(drop):
    return [(se, volume, files, segment(volume)) for se, volume, files in drop if se["modality"] == "CT"]


def test_the_backend_speaks_the_protocol():
    assert isinstance(BACKEND, SegmentationBackend)
    assert BACKEND.name == "classical"


def test_the_drop_has_a_prone_ct_series(ct_results):
    assert len(ct_results) >= 3
    assert any(se["image_orientation"][0] < 0 for se, *_ in ct_results), "seed 3 should plant a prone series"


def test_every_claimed_box_matches_the_truth(ct_results):
    ious: dict[str, list[float]] = {name: [] for name in CLASSES}
    bad = []
    for _, _, files, mask in ct_results:
        for k, f in enumerate(files):
            for name, class_id in CLASSES.items():
                plane = mask[k] == class_id
                if plane.any():
                    value = box_iou(box_of(plane), f["boxes"].get(name))
                    ious[name].append(value)
                    if value < 0.8:
                        bad.append(f"{f['path']} {name}: got {box_of(plane)}, truth {f['boxes'].get(name)}")
    summary = iou_summary(ious)
    print("classical vs synthetic truth:", summary)
    assert not bad, f"IoU < 0.8 on {len(bad)} claims ({summary}): {bad[:5]}"
    assert ious["lung_left"] and ious["lung_right"] and ious["vertebrae"] and ious["aorta"], summary


def test_the_body_outline_matches_the_truth(ct_results):
    ious = []
    for _, volume, files, _ in ct_results:
        outline = body_outline(volume)
        ious += [box_iou(box_of(outline[k]), f["boxes"]["body"]) for k, f in enumerate(files)]
    # The phantom's lungs may poke through its body ellipse; the truth body box includes them.
    assert min(ious) >= 0.8 and np.median(ious) >= 0.95, iou_summary({"body": ious})


def test_lungs_and_vertebrae_are_found_where_the_truth_has_them(ct_results):
    for name, min_recall in (("lung_left", 0.9), ("lung_right", 0.9), ("vertebrae", 0.95)):
        present = found = 0
        for _, _, files, mask in ct_results:
            for k, f in enumerate(files):
                box = f["boxes"].get(name)
                if box and (box[2] - box[0]) * (box[3] - box[1]) >= 400:  # at least ~20 x 20 px
                    present += 1
                    found += bool((mask[k] == CLASSES[name]).any())
        assert present and found / present >= min_recall, f"{name}: found on {found} of {present} slices"


def test_the_aorta_is_claimed_with_contrast_and_only_then(ct_results):
    for se, volume, files, mask in ct_results:
        centre_hu = []
        for k, f in enumerate(files):
            c0, r0, c1, r1 = f["boxes"]["aorta"]
            rc, cc = (r0 + r1) // 2, (c0 + c1) // 2
            centre_hu.append(float(np.median(volume.values[k, rc - 2:rc + 3, cc - 2:cc + 3])))
        claimed = (mask == AORTA).any(axis=(1, 2))
        if np.median(centre_hu) > 130:  # enhanced blood; unenhanced reads ~40 HU
            assert claimed.mean() >= 0.9, f"{se['series_uid']}: contrast, aorta on {claimed.sum()}/{len(files)}"
        else:
            assert not claimed.any(), f"{se['series_uid']}: no contrast, yet an aorta on {claimed.sum()} slices"


def test_left_and_right_are_never_swapped(ct_results):
    prone = 0
    for se, volume, files, mask in ct_results:
        prone += se["image_orientation"][0] < 0
        x = patient_x(volume)
        for k, f in enumerate(files):
            truth_x = {}
            for name in ("lung_left", "lung_right"):
                if name in f["boxes"]:
                    c0, r0, c1, r1 = f["boxes"][name]
                    truth_x[name] = x[k, (r0 + r1) // 2, (c0 + c1) // 2]
            for name, class_id in (("lung_left", LUNG_LEFT), ("lung_right", LUNG_RIGHT)):
                plane = mask[k] == class_id
                if plane.any():
                    assert name in f["boxes"], f"{f['path']}: {name} claimed where there is none"
                    other = "lung_right" if name == "lung_left" else "lung_left"
                    if other in truth_x:  # nearer its own truth than the other side's
                        mine = abs(x[k][plane].mean() - truth_x[name])
                        assert mine < abs(x[k][plane].mean() - truth_x[other]), f"{f['path']}: {name} swapped"
            if (mask[k] == LUNG_LEFT).any() and (mask[k] == LUNG_RIGHT).any():
                assert x[k][mask[k] == LUNG_LEFT].mean() > x[k][mask[k] == LUNG_RIGHT].mean()
    assert prone >= 1


def test_a_series_stored_rotated_gets_the_mirrored_mask(ct_results):
    se, volume, files, mask = next(r for r in ct_results if r[0]["image_orientation"][0] > 0)
    flipped = flip_in_plane(volume)
    assert flipped.row_direction[0] < 0
    got = segment(flipped)
    rows, cols = volume.values.shape[1:]
    for k, f in enumerate(files):
        for name in ("lung_left", "lung_right", "vertebrae"):
            plane = got[k] == CLASSES[name]
            if plane.any():
                assert box_iou(box_of(plane), flip_box(f["boxes"][name], rows, cols)) >= 0.8, (f["path"], name)
    same = (got[:, ::-1, ::-1] == mask).mean()
    assert same > 0.999, f"rotating the storage changed {1 - same:.4%} of the labels"


def test_one_slice_alone_is_segmented_like_in_its_series(ct_results):
    _, volume, files, _ = ct_results[0]
    # A chest slice above the liver: lower down the right lung is a sliver over the dome, which
    # only the neighbouring slices can vouch for.
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1]) if b else 0  # noqa: E731
    k = int(np.argmax([0 if "liver" in f["boxes"] else min(area(f["boxes"].get("lung_left")),
                                                           area(f["boxes"].get("lung_right"))) for f in files]))
    one = SeriesVolume(volume.image_ids[k:k + 1], "CT", volume.values[k:k + 1], volume.orientation,
                       volume.positions[k:k + 1], volume.spacing)
    got = segment(one)
    for name in ("lung_left", "lung_right", "vertebrae"):
        assert box_iou(box_of(got[0] == CLASSES[name]), files[k]["boxes"][name]) >= 0.8, name


def test_mr_series_get_an_empty_mask(drop):
    mr = [volume for se, volume, _ in drop if se["modality"] == "MR"]
    assert mr, "seed 3 should hold MR series"
    for volume in mr:
        mask = segment(volume)
        assert mask.shape == volume.values.shape and not mask.any()
        assert not body_outline(volume).any()


# ---- hand-built volumes ----------------------------------------------------------------------

def two_lung_volume(row_direction: tuple[float, float, float], slices: int = 3) -> SeriesVolume:
    """A body ellipse (40 HU) holding two air ellipses (-850 HU) at x = -/+ 60 mm, 2 mm pixels."""
    size, spacing = 160, 2.0
    col_direction = (0.0, 1.0, 0.0)
    origin = np.array([-(size - 1) / 2 * spacing * row_direction[0], -(size - 1) / 2 * spacing, 0.0])
    i, j = np.mgrid[:size, :size] * spacing
    x = origin[0] + j * row_direction[0]
    y = origin[1] + i
    plane = np.full((size, size), -1000.0)
    plane[(x / 140) ** 2 + (y / 100) ** 2 <= 1] = 40.0
    for cx in (-60.0, 60.0):
        plane[((x - cx) / 40) ** 2 + (y / 65) ** 2 <= 1] = -850.0
    values = np.repeat(plane[None], slices, axis=0).astype(np.int16)
    positions = np.array([[origin[0], origin[1], 5.0 * s] for s in range(slices)])
    return SeriesVolume(tuple(f"s{s}" for s in range(slices)), "CT", values,
                        (*row_direction, *col_direction), positions, (spacing, spacing))


@pytest.mark.parametrize("row_direction", [(1.0, 0.0, 0.0), (-1.0, 0.0, 0.0)], ids=["supine", "flipped"])
def test_two_air_ellipses_become_two_lungs_on_the_sides_the_orientation_says(row_direction):
    volume = two_lung_volume(row_direction)
    mask = segment(volume)
    x = patient_x(volume)
    for class_id, sign in ((LUNG_LEFT, 1.0), (LUNG_RIGHT, -1.0)):
        plane = mask == class_id
        assert plane.any(axis=(1, 2)).all(), f"class {class_id} missing on some slice"
        assert np.all(np.sign(x[plane]) == sign), f"class {class_id} has pixels on the wrong side"
        assert abs(plane[0].sum() * 4.0 - np.pi * 40 * 65) < 0.1 * np.pi * 40 * 65  # the ellipse's area, mm2
    left_cols = np.flatnonzero((mask[0] == LUNG_LEFT).any(axis=0))
    assert (left_cols.mean() > 80) == (row_direction[0] > 0)  # patient left is on the image right when supine


def test_odd_inputs_pass_check_mask():
    rng = np.random.default_rng(0)
    air = SeriesVolume(("a", "b"), "CT", np.full((2, 64, 64), -1000, np.int16), (1, 0, 0, 0, 1, 0),
                       np.zeros((2, 3)), (1.0, 1.0))
    assert not segment(air).any()
    tiny = SeriesVolume(("t",), "CT", rng.integers(-1000, 1500, (1, 4, 4)).astype(np.int16), (1, 0, 0, 0, 1, 0),
                        np.zeros((1, 3)), (0.5, 0.5))
    segment(tiny)
    mixed = two_lung_volume((1.0, 0.0, 0.0), slices=3)
    values = mixed.values.copy()
    values[1] = -1000  # an all-air slice between two chest slices
    got = segment(SeriesVolume(mixed.image_ids, "CT", values, mixed.orientation, mixed.positions, mixed.spacing))
    assert not got[1].any() and (got[0] == LUNG_LEFT).any()
    sagittal = SeriesVolume(("s",), "CT", values[:1], (0, 1, 0, 0, 0, -1), np.zeros((1, 3)), (2.0, 2.0))
    assert not segment(sagittal).any()  # the positional rules are axial: nothing claimed


# ---- real CT from pydicom --------------------------------------------------------------------

# pydicom's and pydicom-data's files are a dev dependency: without them these tests fail, never skip.
MISSING = ("install radground with its dev extras (`make venv`, or `pip install -e '.[dev]'`): pydicom-data==1.0.0 "
           "brings the files, pylibjpeg* (main dependencies) decode them")


def real_ct_files(files: list[Path]) -> list[Path]:
    """Single-frame axial CT among ``files`` (the ``pydicom_files_on_disk`` fixture's)."""
    found = []
    for path in files:
        try:
            with warnings.catch_warnings():  # pydicom's deliberately broken files complain
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        iop = ds.get("ImageOrientationPatient")
        if ds.get("Modality") == "CT" and iop and int(ds.get("NumberOfFrames", 1) or 1) == 1 \
                and abs(np.cross([float(v) for v in iop[:3]], [float(v) for v in iop[3:]])[2]) > 0.7:
            found.append(path)
    return found


@pytest.fixture(scope="module")
def real_ct(pydicom_files_on_disk):
    volumes = {}
    for path in real_ct_files(pydicom_files_on_disk):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                volume, _ = read_series([path])
        except Exception:  # noqa: BLE001 - a codec this environment lacks
            continue
        volumes[path.name] = volume
    if not volumes:
        pytest.fail(f"no decodable axial CT among pydicom's test files: {MISSING}")
    return volumes


def test_real_ct_fractions_are_plausible(real_ct):
    for name, volume in real_ct.items():
        mask = segment(volume)
        hu = volume.values.astype(float)
        fractions = {key: float((mask == cid).mean()) for key, cid in CLASSES.items()}
        lung = fractions["lung_left"] + fractions["lung_right"]
        assert lung <= float(((hu < -400) & (hu > -1100)).mean()) + 1e-9, (name, fractions)  # lungs are air
        assert fractions["vertebrae"] <= 1.2 * float((hu > 150).mean()) + 1e-9, (name, fractions)  # bone is dense
        assert fractions["vertebrae"] <= 0.5 and lung <= 0.6, (name, fractions)
        body = float(body_outline(volume).mean())  # tissue plus the air it encloses
        tissue, air = float((hu > -500).mean()), float(((hu < -400) & (hu > -1100)).mean())
        assert 0.5 * tissue <= body <= tissue + air + 0.05, (name, body, tissue, air)
        assert lung <= body, (name, lung, body)
        if (mask == VERTEBRAE).any():
            assert np.median(hu[mask == VERTEBRAE]) > 150, name
        if lung:
            assert np.median(hu[(mask == LUNG_LEFT) | (mask == LUNG_RIGHT)]) < -500, name


def test_real_lungs_are_on_the_sides_the_orientation_says(real_ct):
    for name, volume in real_ct.items():
        for candidate in (volume, flip_in_plane(volume)):
            mask = segment(candidate)
            x = patient_x(candidate)
            left, right = mask == LUNG_LEFT, mask == LUNG_RIGHT
            if left.any() and right.any():
                assert x[left].mean() > x[right].mean(), name
            bone = candidate.values > 200  # the spine sits mid-patient: lungs lie either side of dense bone
            if bone.any():
                centre = x[bone].mean()
                assert not left.any() or x[left].mean() > centre, name
                assert not right.any() or x[right].mean() < centre, name


# What pydicom's images show (looked at by eye): what a correct backend must and must not find.
SEEN = {
    "CT_small.dcm": {"must": {LUNG_LEFT, LUNG_RIGHT, VERTEBRAE, AORTA}, "never": set()},  # zoomed thoracic spine
    "bad_sequence.dcm": {"must": {VERTEBRAE}, "never": set()},  # zoomed lower thoracic spine
    # abdomen with bowel gas, stored upside down (column direction -y: the spine is at the top)
    "explicit_VR-UN.dcm": {"must": {VERTEBRAE}, "never": {LUNG_LEFT, LUNG_RIGHT}},
    "693_J2KI.dcm": {"must": set(), "never": set(CLASSES.values())},  # head
    "693_UNCR.dcm": {"must": set(), "never": set(CLASSES.values())},
    "J2K_pixelrep_mismatch.dcm": {"must": set(), "never": set(CLASSES.values())},  # skull base, mastoid air
}


def test_what_the_real_images_show(real_ct):
    missing = sorted(set(SEEN) - set(real_ct))
    assert not missing, f"pydicom images not installed or not decodable: {missing}; {MISSING}"
    for name, expect in SEEN.items():
        present = set(np.unique(segment(real_ct[name])).tolist()) - {0}
        assert expect["must"] <= present, f"{name}: missing {expect['must'] - present}"
        assert not (expect["never"] & present), f"{name}: claimed {expect['never'] & present}"


def test_real_ct_aorta_lies_on_the_patient_left_of_the_spine(real_ct):
    assert "CT_small.dcm" in real_ct, f"CT_small.dcm (shipped with pydicom) not installed or not decodable; {MISSING}"
    volume = real_ct["CT_small.dcm"]
    mask = segment(volume)
    x = patient_x(volume)
    assert x[mask == AORTA].mean() > x[mask == VERTEBRAE].mean()


# ---- the fast paths against scipy's plain operations -----------------------------------------
# The backend replaces scipy's disk morphology, hole filling, propagation and whole-plane
# distance maps by faster equivalents (issue 13); each must give exactly what scipy gives.

def random_masks(seed: int, count: int = 40):
    """Seeded (2, H, W) masks from 1 x 1 up to 60 x 60 pixels, sparse to nearly full."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = (2, int(rng.integers(1, 61)), int(rng.integers(1, 61)))
        yield rng, rng.random(shape) < rng.uniform(0.02, 0.98)


def test_disk_dilation_and_erosion_equal_scipys():
    from scipy import ndimage

    from tasks.segment.classical import _dilate_disk, _dilate_disk_boxed, _disk, _erode_disk

    radii = (0.4, 1.0, 1.3, 1.5, 2.5, 3.24, 4.0, 6.8, 9.5)  # 1.5: a disk whose outer rows are empty
    for k, (_, mask) in enumerate(random_masks(11)):
        radius = radii[k % len(radii)]
        expected = ndimage.binary_dilation(mask, structure=_disk(radius))
        assert np.array_equal(_dilate_disk(mask, radius), expected), (mask.shape, radius)
        assert np.array_equal(_dilate_disk_boxed(mask, radius), expected), (mask.shape, radius)
        assert np.array_equal(_erode_disk(mask, radius), ndimage.binary_erosion(mask, structure=_disk(radius))), \
            (mask.shape, radius)


def test_hole_filling_and_propagation_equal_scipys():
    from scipy import ndimage

    from tasks.segment.classical import _PLANE, _PLANE_CROSS, _fill_holes, _reconstruct

    for rng, mask in random_masks(12):
        assert np.array_equal(_fill_holes(mask), ndimage.binary_fill_holes(mask, structure=_PLANE)), mask.shape
        seeds = mask & (rng.random(mask.shape) < 0.03)
        assert np.array_equal(_reconstruct(seeds, mask, _PLANE_CROSS),
                              ndimage.binary_propagation(seeds, structure=_PLANE_CROSS, mask=mask)), mask.shape
    ring = np.ones((1, 9, 9), dtype=bool)
    ring[0, 2:7, 2:7] = False  # a 5 x 5 hole: filled; the same hole opened to the edge: not
    assert _fill_holes(ring).all()
    ring[0, 4, 7:] = False
    assert not _fill_holes(ring)[0, 4, 4]


def test_per_slice_labels_know_their_slice():
    from scipy import ndimage

    from tasks.segment.classical import _PLANE, _slice_of

    for _, mask in random_masks(13):
        labels, n = ndimage.label(mask, structure=_PLANE)
        expected = [0] + [found[0].start for found in ndimage.find_objects(labels)]
        assert _slice_of(labels, n).tolist() == expected


def test_cropped_distance_maps_equal_whole_plane_ones():
    from scipy import ndimage

    from tasks.segment.classical import _Grid

    grid = _Grid(px=np.zeros((1, 1), np.float32), py=np.zeros((1, 1), np.float32), spacing=(0.7, 0.9))
    masks = [mask for _, mask in random_masks(14)]
    masks += [np.ones((2, 5, 7), dtype=bool), np.zeros((2, 5, 7), dtype=bool)]
    for mask in masks:
        for edge_is_outside in (False, True):
            pad = int(edge_is_outside)
            expected = np.full(mask.shape, np.inf, dtype=np.float32)  # all-True plane: no False pixel
            for k, plane in enumerate(mask):
                plane = np.pad(plane, pad)  # the image edge as a False ring
                if not plane.all():
                    full = ndimage.distance_transform_edt(plane, sampling=grid.spacing)
                    expected[k] = full[pad:full.shape[0] - pad, pad:full.shape[1] - pad]
            assert np.array_equal(grid.distance(mask, edge_is_outside), expected), (mask.shape, edge_is_outside)


def test_the_hull_equals_the_polygon_of_all_pixels():
    from tasks.segment.classical import _hull

    for _, mask in random_masks(15, count=20):
        mask = mask & (np.random.default_rng(mask.size).random(mask.shape) < 0.05)  # scattered points
        rows, cols = mask.shape[1:]
        i, j = np.mgrid[:rows, :cols].astype(np.float32)
        expected = np.zeros(mask.shape, dtype=bool)
        for k, plane in enumerate(mask):
            if not plane.any():
                continue
            fi, fj = np.nonzero(plane)  # every pixel's projection, not just the rows' ends
            expected[k] = True
            for theta in np.arange(8) * np.pi / 8:
                cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
                proj = cos * fi + sin * fj
                line = cos * i + sin * j
                expected[k] &= (line >= proj.min() - 0.5) & (line <= proj.max() + 0.5)
        assert np.array_equal(_hull(mask, (slice(None), slice(0, rows), slice(0, cols))), expected), mask.shape


def test_smoothing_only_the_body_region_changes_nothing_that_is_read(drop):
    from scipy import ndimage

    from tasks.segment.classical import ClassicalSettings, _smoothed

    cfg = ClassicalSettings()
    for se, volume, _ in drop:
        if se["modality"] != "CT":
            continue
        hu, smooth, exact = _smoothed(volume, cfg)
        sigma = cfg.smooth_mm / np.array(volume.spacing)
        full = ndimage.gaussian_filter(volume.values.astype(np.float32), sigma=(0.0, *sigma))
        assert np.array_equal(smooth[:, exact[0], exact[1]], full[:, exact[0], exact[1]]), se["series_uid"]
        # Outside the exact box the body threshold must read the same as on the whole image.
        assert np.array_equal(smooth > cfg.body_hu, full > cfg.body_hu), se["series_uid"]
        # The box covers the body's box plus the 16-pixel margin that _segment_ct reads.
        tissue = full > cfg.body_hu
        rows, cols = np.flatnonzero(tissue.any(axis=(0, 2))), np.flatnonzero(tissue.any(axis=(0, 1)))
        assert exact[0].start <= max(rows[0] - 16, 0) and exact[0].stop >= min(rows[-1] + 17, hu.shape[1])
        assert exact[1].start <= max(cols[0] - 16, 0) and exact[1].stop >= min(cols[-1] + 17, hu.shape[2])


def whole_slice_aorta(smooth, inside, cfg, grid, core):
    """The aorta rule of _aorta written over whole slices with scipy alone (no search crop)."""
    from scipy import ndimage

    from tasks.segment.classical import _disk

    vessel = (smooth >= cfg.contrast_hu[0]) & (smooth <= cfg.contrast_hu[1]) & inside
    vessel &= ~ndimage.binary_dilation(smooth > cfg.cortex_hu, structure=_disk(1.0 / grid.px_mm))
    cx, cy, cr = (np.nan_to_num(core[:, k], nan=-1e9).astype(np.float32)[:, None, None] for k in range(3))
    dx, ahead = grid.px[None] - cx, cy - grid.py[None]
    vessel &= np.hypot(dx, ahead) > cr + 1.0
    edt = np.full(vessel.shape, np.inf, dtype=np.float32)
    for k, plane in enumerate(vessel):
        if not plane.all():
            edt[k] = ndimage.distance_transform_edt(plane, sampling=grid.spacing)
    size = max(3, int(round(9.0 / grid.px_mm)) | 1)
    lo_r, hi_r = (d / 2.0 for d in cfg.aorta_diameter_mm)
    peak = (edt == ndimage.maximum_filter(edt, size=(1, size, size))) & (edt >= lo_r) & (edt <= hi_r)
    peak &= (dx >= -15.0) & (dx <= 50.0) & (ahead >= 0.0) & (ahead <= cr + 60.0)
    score = np.where(peak, -np.hypot(dx, ahead), -np.inf).reshape(len(core), -1)
    best = score.argmax(axis=1)
    rows = np.arange(len(core))
    found = np.isfinite(score[rows, best])
    bi, bj = np.unravel_index(best, grid.px.shape)
    radius = edt.reshape(len(core), -1)[rows, best]
    centre_x, centre_y = grid.px[bi, bj][:, None, None], grid.py[bi, bj][:, None, None]
    disk = np.hypot(grid.px[None] - centre_x, grid.py[None] - centre_y) <= (radius + 1.5)[:, None, None]
    return vessel & disk & found[:, None, None]


def test_the_aorta_search_crop_finds_what_the_whole_slice_finds(drop, monkeypatch):
    from tasks.segment import classical

    calls = []
    real = classical._aorta

    def spy(*args):
        found = real(*args)
        calls.append((args, found))
        return found

    monkeypatch.setattr(classical, "_aorta", spy)
    for se, volume, _ in drop:
        if se["modality"] == "CT":
            ClassicalBackend().segment(volume)
    assert calls and any(found.any() for _, found in calls), "no aorta found: nothing compared"
    for args, found in calls:
        assert np.array_equal(found, whole_slice_aorta(*args))


def test_an_aorta_at_the_search_windows_edge_is_whole():
    """A 28 mm enhanced disk centred 3 mm inside the window's left edge (47 mm patient-left of the
    core, the window ends at 50 mm) reaches 11 mm beyond it: the crop must still hold all of it."""
    from tasks.segment.classical import ClassicalSettings, _aorta, _Grid

    i, j = np.mgrid[:200, :200].astype(np.float32)  # 1 mm pixels: x = column, y = row
    grid = _Grid(px=j, py=i, spacing=(1.0, 1.0))
    smooth = np.full((1, 200, 200), 40.0, dtype=np.float32)
    smooth[0][np.hypot(j - 147.0, i - 60.0) <= 14.0] = 300.0
    core = np.array([[100.0, 100.0, 10.0]])  # x, y, radius (mm) of the vertebral body's disk
    inside = np.ones(smooth.shape, dtype=bool)
    found = _aorta(smooth, inside, ClassicalSettings(), grid, core)
    assert np.array_equal(found, whole_slice_aorta(smooth, inside, ClassicalSettings(), grid, core))
    assert found[0, 60, 147] and found[0, 60, 160] and not found[0, 60, 163]
