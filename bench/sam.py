"""SAM refinement on CPU: seconds per 512 x 512 CT slice with a full-size vit_b.

Random weights (no checkpoint needed): the cost is the architecture's, not the weights',
so this is what a user without a GPU should expect per slice (one image embedding plus
one batched decoder call for 3 box prompts).
"""

from __future__ import annotations

import time

import numpy as np


def _ct_slices(count: int, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(count, size, size) HU phantom and its 3-class coarse mask (liver, aorta, vertebrae)."""
    yy, xx = np.mgrid[:size, :size]

    def disk(cy, cx, ry, rx):
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0

    hu = np.full((size, size), -1000, dtype=np.int16)
    hu[disk(256, 256, 180, 230)] = 40  # body, soft tissue
    coarse = np.zeros((size, size), dtype=np.uint8)
    for class_id, region, value in ((5, disk(230, 170, 80, 90), 60), (52, disk(300, 280, 18, 18), 300),
                                    (121, disk(360, 256, 30, 34), 700)):
        hu[region] = value
        coarse[region] = class_id
    return np.repeat(hu[None], count, axis=0), np.repeat(coarse[None], count, axis=0)


def bench_sam(timed_slices: int = 2, seed: int = 0) -> dict:
    import torch
    from segment_anything import sam_model_registry

    from radground.settings import SegmentationSettings
    from tasks.segment.base import SeriesVolume
    from tasks.segment.sam import SamRefiner

    torch.manual_seed(seed)
    model = sam_model_registry["vit_b"](checkpoint=None)
    refiner = SamRefiner(SegmentationSettings(device="cpu", sam_model="vit_b"), model=model)

    def volume(count: int) -> tuple[SeriesVolume, np.ndarray]:
        hu, coarse = _ct_slices(count)
        positions = np.array([[0.0, 0.0, 5.0 * k] for k in range(count)])
        return SeriesVolume(tuple(f"s{k}" for k in range(count)), "CT", hu, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                            positions, (0.7, 0.7)), coarse

    refiner.refine(*volume(1))  # warm-up: kernel selection, allocator
    started = time.perf_counter()
    _, stats = refiner.refine(*volume(timed_slices))
    seconds = time.perf_counter() - started
    return {"model": "vit_b", "device": "cpu", "torch_threads": torch.get_num_threads(),
            "slice_px": 512, "classes_per_slice": 3, "slices": stats["slices"],
            "seconds_per_slice": round(seconds / timed_slices, 2)}


if __name__ == "__main__":
    print(bench_sam())
