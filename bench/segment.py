"""Classical CT segmentation throughput on the synthetic drop's CT series, beside a baseline revision.

Per core: the backend is single-threaded (scipy.ndimage, numpy), so slices per CPU-second of this
process is its per-core rate, and stays meaningful on a shared machine where wall time does not.
The baseline is tasks/segment/classical.py as of BASELINE (the last revision before the speed-up),
loaded from git and run on the same volumes in the same run, interleaved volume by volume so both
see the same load; the box IoU against the drop's truth is reported for both.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

BASELINE = "bb8cb2bef7f4a549122f8c010a1b92815a6190f1"  # classical.py before the per-core speed-up (issue 13)
CLASSES = ("lung_left", "lung_right", "vertebrae", "aorta")


def _ct_volumes(drop: Path, truth: dict):
    """(volume, truth boxes per slice) for each axial CT series, slices in file order."""
    from radground.volume import SeriesVolume

    for patient in truth["patients"]:
        for study in patient["studies"]:
            for series in study["series"]:
                if series["kind"] != "axial" or series["modality"] != "CT":
                    continue
                datasets = [pydicom.dcmread(drop / f["path"]) for f in series["files"]]
                yield SeriesVolume(
                    image_ids=tuple(ds.SOPInstanceUID for ds in datasets), modality="CT",
                    values=np.stack([(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
                                     .astype(np.int16) for ds in datasets]),
                    orientation=tuple(float(v) for v in datasets[0].ImageOrientationPatient),
                    positions=np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets]),
                    spacing=tuple(float(v) for v in datasets[0].PixelSpacing)), [f["boxes"] for f in series["files"]]


def _baseline_backend(revision: str):
    """ClassicalBackend from tasks/segment/classical.py at a git revision; None where git cannot show it."""
    root = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(["git", "show", f"{revision}:tasks/segment/classical.py"], cwd=root, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "classical_baseline.py"
        path.write_text(source, encoding="utf-8")
        spec = importlib.util.spec_from_file_location("classical_baseline", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module.ClassicalBackend()


def _box_iou(plane: np.ndarray, truth: list[int] | None) -> float:
    """IoU of the plane's inclusive pixel box [col0, row0, col1, row1] with the truth's; 0 without truth."""
    if truth is None:
        return 0.0
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    box = (cols[0], rows[0], cols[-1], rows[-1])
    w = min(box[2], truth[2]) - max(box[0], truth[0]) + 1
    h = min(box[3], truth[3]) - max(box[1], truth[1]) + 1
    inter = max(w, 0) * max(h, 0)
    area = lambda q: (q[2] - q[0] + 1) * (q[3] - q[1] + 1)  # noqa: E731
    return inter / (area(box) + area(truth) - inter)


def _iou_table(masks: list[np.ndarray], boxes: list[list[dict]]) -> dict:
    """Per class: claimed slices, min and median box IoU against the truth."""
    from tasks.segment.classical import AORTA, LUNG_LEFT, LUNG_RIGHT, VERTEBRAE

    ids = dict(zip(CLASSES, (LUNG_LEFT, LUNG_RIGHT, VERTEBRAE, AORTA), strict=True))
    ious: dict[str, list[float]] = {name: [] for name in CLASSES}
    for mask, per_slice in zip(masks, boxes, strict=True):
        for k, truth in enumerate(per_slice):
            for name in CLASSES:
                plane = mask[k] == ids[name]
                if plane.any():
                    ious[name].append(_box_iou(plane, truth.get(name)))
    return {name: {"n": len(v), "min": round(min(v), 4), "median": round(float(np.median(v)), 4)}
            for name, v in ious.items() if v}


def _run(backend, volume) -> tuple[np.ndarray, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    mask = backend.segment(volume)
    return mask, time.perf_counter() - wall, time.process_time() - cpu


def _figures(slices: int, wall: float, cpu: float, masks: list[np.ndarray], boxes: list) -> dict:
    return {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "slices_per_s": round(slices / wall, 1),
            "slices_per_cpu_s": round(slices / cpu, 1), "iou": _iou_table(masks, boxes)}


def bench_classical(patients: int = 8, seed: int = 0, baseline: str | None = BASELINE) -> dict:
    from radground.synth.drop import generate_drop
    from tasks.segment.classical import ClassicalBackend

    with tempfile.TemporaryDirectory() as tmp:
        result = generate_drop(Path(tmp) / "drop", patients=patients, seed=seed)
        series = list(_ct_volumes(result.drop_dir, json.loads(result.truth_path.read_text(encoding="utf-8"))))
    volumes, boxes = [v for v, _ in series], [b for _, b in series]
    runs = {"current": ClassicalBackend()}
    reference = _baseline_backend(baseline) if baseline else None
    if reference is not None:
        runs["baseline"] = reference
    for backend in runs.values():
        backend.segment(volumes[0])  # warm-up
    masks: dict[str, list] = {name: [] for name in runs}
    wall, cpu = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0)
    for k, volume in enumerate(volumes):
        order = list(runs) if k % 2 == 0 else list(runs)[::-1]  # alternate who runs first
        for name in order:
            mask, w, c = _run(runs[name], volume)
            masks[name].append(mask)
            wall[name] += w
            cpu[name] += c
    slices = sum(len(v.image_ids) for v in volumes)
    out = {"series": len(volumes), "slices": slices, "slice_size": "x".join(map(str, volumes[0].values.shape[1:]))}
    for name in runs:
        out[name] = _figures(slices, wall[name], cpu[name], masks[name], boxes)
    if reference is not None:
        out["baseline_revision"] = baseline[:12]
        out["speed_up_per_core"] = round(cpu["baseline"] / cpu["current"], 2)
        same = sum(int((a == b).sum()) for a, b in zip(masks["current"], masks["baseline"], strict=True))
        out["labels_equal_to_baseline"] = round(same / sum(m.size for m in masks["current"]), 6)
    else:
        out["baseline_revision"] = f"{baseline} not available (no git checkout?)"
    # Kept for older readers of the results: the current backend's figures at the top level.
    out.update(seconds=out["current"]["seconds"], slices_per_s=out["current"]["slices_per_s"])
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(bench_classical(), indent=2))
