"""CT windows and MR scaling against values computed by hand from docs/method.md's table."""

import numpy as np
import pytest

from radground.imaging import normalize, normalize_ct, normalize_mr, pixels_from_bytes

# (HU, expected lung, soft tissue, brain) — e.g. lung: (HU + 1225) / 2250 * 2 - 1.
CT_CASES = [
    (-1000, -0.8, -1.0, -1.0),  # the clip floor: (-1000 + 1225) / 2250 = 0.1 -> -0.8
    (-1100, -0.8, -1.0, -1.0),  # below the floor: clipped to -1000 first
    (-100, 0.0, -0.8, -1.0),  # lung level; soft: 35 / 350 * 2 - 1
    (40, 0.1244444, 0.0, 0.0),  # soft-tissue and brain level; lung: 1265 / 2250 * 2 - 1
    (80, 0.16, 0.2285714, 1.0),  # brain top; soft: 215 / 350 * 2 - 1
    (215, 0.28, 1.0, 1.0),
    (1025, 1.0, 1.0, 1.0),  # lung top
    (3000, 1.0, 1.0, 1.0),
]


@pytest.mark.parametrize(("hu", "lung", "soft", "brain"), CT_CASES)
def test_ct_windows(hu, lung, soft, brain):
    out = normalize_ct(np.full((2, 3), hu, dtype=np.int16))
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], [lung, soft, brain], atol=1e-5)


def test_mr_min_max_to_three_channels():
    out = normalize_mr(np.array([[100, 200], [300, 500]], dtype=np.uint16))
    np.testing.assert_allclose(out[0], [[-1.0, -0.5], [0.0, 1.0]])
    assert out.shape == (3, 2, 2) and np.array_equal(out[0], out[2])
    assert np.all(normalize_mr(np.full((4, 4), 7, dtype=np.uint16)) == 0)


def test_normalize_dispatch_and_pixel_bytes():
    hu = np.arange(-6, 6, dtype=np.int16).reshape(3, 4)
    assert np.array_equal(pixels_from_bytes(hu.astype("<i2").tobytes(), "int16", 3, 4), hu)
    with pytest.raises(ValueError, match=r"expected rows\*cols = 4\*4"):
        pixels_from_bytes(hu.tobytes(), "int16", 4, 4)
    with pytest.raises(ValueError, match="expected CT or MR"):
        normalize(hu, "US")
