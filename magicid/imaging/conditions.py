"""Condition maps for the MMF ControlNet: skeleton maps (MediaPipe pose) and landmark maps (face mesh).

Both are uint8 (H, W, 3) images the size of the source image, drawn on black. Skeleton maps draw the 35
pose connections, coloured by body part (left limbs warm, right limbs cool, torso/face white), joints as
dots, skipping points whose visibility is under `min_visibility`. Landmark maps draw the face-mesh contours
(eyes, brows, irises, lips, nose, face oval; a colour per part) for 478-point meshes, or the points
themselves for other landmark sets (insightface's 106). Line widths follow the image size.
"""

from __future__ import annotations

import functools

import numpy as np

_PART_COLOURS = {
    "face_oval": (255, 255, 255),
    "lips": (255, 64, 64),
    "left_eye": (64, 255, 64),
    "right_eye": (64, 128, 255),
    "left_eyebrow": (160, 255, 0),
    "right_eyebrow": (0, 200, 255),
    "left_iris": (255, 255, 0),
    "right_iris": (255, 0, 255),
    "nose": (255, 160, 0),
}


@functools.cache
def _mesh_parts() -> list[tuple[tuple[int, int, int], np.ndarray]]:
    from magicid.imaging import mesh_edges  # mediapipe's edge lists, copied: no mediapipe import to draw

    parts = []
    for name, colour in _PART_COLOURS.items():
        edges = np.array(sorted(getattr(mesh_edges, f"FACEMESH_{name.upper()}")), dtype=np.int64)
        parts.append((colour, edges))
    return parts


@functools.cache
def _pose_edges() -> list[tuple[tuple[int, int, int], int, int]]:
    from magicid.imaging.mesh_edges import POSE_CONNECTIONS

    edges = []
    for a, b in sorted(POSE_CONNECTIONS):
        if a <= 10 and b <= 10:
            colour = (255, 255, 255)  # face
        elif a % 2 == 1 and b % 2 == 1:
            colour = (255, 96, 0)  # subject's left side (odd indices)
        elif a % 2 == 0 and b % 2 == 0:
            colour = (0, 160, 255)  # subject's right side
        else:
            colour = (200, 200, 200)  # across the torso
        edges.append((colour, a, b))
    return edges


def _thickness(height: int, width: int) -> int:
    return max(1, int(round(max(height, width) / 256)))


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"condition map size must be positive, got {height}x{width}")


def render_skeleton_map(height: int, width: int, skeletons, min_visibility: float = 0.5) -> np.ndarray:
    """Draw body skeletons.

    Args:
        height, width: output size (px).
        skeletons: per person a (33, 2) `x, y` or (33, 3) `x, y, visibility` array in pixels (None entries
            are skipped: people without a skeleton).
        min_visibility: points below it (and their edges) are not drawn.

    Returns:
        uint8 (height, width, 3), black where nothing is drawn.
    """
    import cv2

    _check_size(height, width)
    canvas = np.zeros((height, width, 3), np.uint8)
    thickness = _thickness(height, width)
    for skeleton in skeletons:
        if skeleton is None:
            continue
        points = np.asarray(skeleton, dtype=np.float64)
        if points.ndim != 2 or points.shape[0] != 33 or points.shape[1] not in (2, 3):
            raise ValueError(f"a skeleton must be (33, 2) or (33, 3), got {points.shape}")
        visible = points[:, 2] >= min_visibility if points.shape[1] == 3 else np.ones(33, bool)
        visible &= np.isfinite(points[:, :2]).all(axis=1)
        xy = np.round(points[:, :2]).astype(np.int64)
        for colour, a, b in _pose_edges():
            if visible[a] and visible[b]:
                cv2.line(
                    canvas, tuple(map(int, xy[a])), tuple(map(int, xy[b])), colour, thickness, cv2.LINE_AA
                )
        for index in np.flatnonzero(visible):
            cv2.circle(canvas, tuple(map(int, xy[index])), thickness + 1, (255, 255, 255), -1, cv2.LINE_AA)
    return canvas


def render_landmark_map(height: int, width: int, faces_landmarks) -> np.ndarray:
    """Draw dense face landmarks.

    Args:
        height, width: output size (px).
        faces_landmarks: per face an (N, 2) array in pixels; N = 478 draws mesh contours, any other N dots.

    Returns:
        uint8 (height, width, 3), black where nothing is drawn.
    """
    import cv2

    _check_size(height, width)
    canvas = np.zeros((height, width, 3), np.uint8)
    thickness = _thickness(height, width)
    for landmarks in faces_landmarks:
        points = np.asarray(landmarks, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0:
            raise ValueError(f"landmarks must be (N, 2) with N > 0, got {points.shape}")
        if not np.isfinite(points).all():
            raise ValueError("landmarks contain non-finite coordinates")
        xy = np.round(points).astype(np.int64)
        if points.shape[0] == 478:
            for colour, edges in _mesh_parts():
                lines = xy[edges].astype(np.int32)  # (E, 2, 2)
                cv2.polylines(canvas, list(lines), False, colour, thickness, cv2.LINE_AA)
        else:
            for x, y in xy:
                cv2.circle(canvas, (int(x), int(y)), thickness, (255, 255, 255), -1, cv2.LINE_AA)
    return canvas


def template_landmarks(box) -> np.ndarray:
    """(478, 2) float32: the face-mesh template (`mesh_template.MESH_TEMPLATE_XY`) fitted to a face box.

    What a box-only layout draws in each box, so that the ControlNet sees the same kind of landmark map as
    in training (real 478-point meshes drawn by `render_landmark_map`), not a different drawing.

    Args:
        box: `x0, y0, x1, y1` in pixels (a face detection box, or a layout box meant as one).
    """
    from magicid.imaging.mesh_template import MESH_TEMPLATE_XY

    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"expected a box x0 < x1, y0 < y1, got {tuple(box)}")
    template = np.asarray(MESH_TEMPLATE_XY, np.float32)  # (478, 2) in box coordinates
    return (template * np.array([x1 - x0, y1 - y0], np.float32) + np.array([x0, y0], np.float32)).astype(
        np.float32
    )


def box_from_mesh_extent(drawn_box) -> tuple[float, float, float, float]:
    """The face box whose template mesh (`template_landmarks`) spans `drawn_box` (x0, y0, x1, y1 px): the
    inverse of drawing a box's template, for reading face boxes back from a landmark map."""
    from magicid.imaging.mesh_template import MESH_TEMPLATE_XY

    template = np.asarray(MESH_TEMPLATE_XY, np.float64)
    low, high = template.min(axis=0), template.max(axis=0)  # the mesh's extent inside its box (fractions)
    x0, y0, x1, y1 = (float(v) for v in drawn_box)
    width, height = (x1 - x0) / (high[0] - low[0]), (y1 - y0) / (high[1] - low[1])
    left, top = x0 - low[0] * width, y0 - low[1] * height
    return left, top, left + width, top + height


# MediaPipe pose's face points 0-10 (nose; left eye inner, centre, outer; right eye inner, centre, outer; left
# ear, right ear; mouth left, right; left = the subject's left) as face-mesh landmarks: the iris centres for the
# eyes, the eye corners, the face-oval points level with the ears, the mouth corners.
_POSE_FACE_FROM_MESH = (1, 362, 473, 263, 133, 468, 33, 454, 234, 291, 61)


def head_skeleton(landmarks, kps5) -> np.ndarray:
    """A pose skeleton of a face without a body: (33, 3) `x, y, visibility`, points 0-10 (the face) visible,
    the body's points (11-32) not.

    `render_skeleton_map` draws it as the face figure of a real pose (white and grey edges only, which is how
    `boxes_from_skeleton_map` recognises a face). The points come from the 478-point mesh where there is one
    (`_POSE_FACE_FROM_MESH`), else from the 5 keypoints: eye centres, nose and mouth corners as they are, eye
    corners at a fifth of the eye distance either side of each eye centre, ears 0.65 eye distances out from
    each eye along the eye line.

    Args:
        landmarks: (N, 2) px face landmarks.
        kps5: (5, 2) px: image-left eye, image-right eye, nose, image-left and image-right mouth corners.
    """
    landmarks = np.asarray(landmarks, np.float64)
    kps = np.asarray(kps5, np.float64).reshape(5, 2)
    points = np.zeros((33, 3), np.float32)
    if landmarks.shape == (478, 2):
        face = landmarks[list(_POSE_FACE_FROM_MESH)]
    else:
        image_left, image_right = kps[0], kps[1]  # the subject's right and left eye
        axis = image_right - image_left  # from the subject's right eye to the left
        face = np.stack([
            kps[2],
            image_right - 0.2 * axis, image_right, image_right + 0.2 * axis,  # subject's left eye: in, centre, out
            image_left + 0.2 * axis, image_left, image_left - 0.2 * axis,  # subject's right eye
            image_right + 0.65 * axis, image_left - 0.65 * axis,  # left ear, right ear
            kps[4], kps[3],  # mouth left (subject's), mouth right
        ])  # fmt: skip
    points[:11, :2] = face
    points[:11, 2] = 1.0
    return points
