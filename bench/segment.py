"""Classical CT segmentation throughput on the synthetic drop's CT series."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom


def _ct_volumes(drop: Path, truth: dict):
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
                    spacing=tuple(float(v) for v in datasets[0].PixelSpacing))


def bench_classical(patients: int = 8, seed: int = 0) -> dict:
    from radground.synth.drop import generate_drop
    from tasks.segment.classical import ClassicalBackend

    with tempfile.TemporaryDirectory() as tmp:
        result = generate_drop(Path(tmp) / "drop", patients=patients, seed=seed)
        volumes = list(_ct_volumes(result.drop_dir, json.loads(result.truth_path.read_text(encoding="utf-8"))))
    backend = ClassicalBackend()
    backend.segment(volumes[0])  # warm-up
    started = time.perf_counter()
    slices = 0
    for volume in volumes:
        backend.segment(volume)
        slices += len(volume.image_ids)
    seconds = time.perf_counter() - started
    return {"series": len(volumes), "slices": slices, "seconds": round(seconds, 2),
            "slices_per_s": round(slices / seconds, 1), "slice_size": "512x512"}
