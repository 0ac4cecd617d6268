"""`sslmed bench register`: its accuracy measure and its known case."""

from __future__ import annotations

import numpy as np

from sslmed.bench.register import known_case, landmark_error


def test_landmark_error_is_the_largest_distance_between_the_two_maps():
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted = a.copy()
    shifted[:3, 3] = [3.0, 4.0, 0.0]
    assert landmark_error(a, a, (10, 10, 10)) == 0.0
    assert np.isclose(landmark_error(shifted, a, (10, 10, 10)), 5.0)
    scaled = a.copy()
    scaled[0, 0] = 2.2  # 0.2 mm more per x voxel: largest at the furthest landmark, x = 9.5 + 5
    assert np.isclose(landmark_error(scaled, a, (20, 10, 10)), 0.2 * 14.5)


def test_the_known_case_moves_the_head_by_the_stated_transform():
    moved, moved_affine, template, template_affine, back = known_case()
    # a point of the moved grid and the template point it was pulled from carry the same intensity
    index = np.array([70, 70, 55])
    world = back @ moved_affine @ np.append(index, 1.0)
    source = np.round(np.linalg.inv(template_affine) @ world)[:3].astype(int)
    assert moved.shape == (140, 140, 110)
    assert abs(float(moved[tuple(index)]) - float(template[tuple(source)])) <= 0.25 * float(np.ptp(template))
    assert np.isclose(np.linalg.det(np.linalg.inv(back)[:3, :3]), 1.06 ** 3)
