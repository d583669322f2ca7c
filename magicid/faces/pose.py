"""Body skeletons with MediaPipe pose (33 landmarks), one person per call, run on each person's crop.

MediaPipe pose returns one person per image, so for a group photo it runs on a square crop around each
face's person (`magicid.imaging.crops.person_box`). The skeleton is kept only when its nose lies in that face's
box (grown by half its size): otherwise the pose found a neighbour, and that person gets no skeleton
rather than a wrong one. `model_complexity=1` only: 0 and 2 download their models at run time.
License: MediaPipe models Apache-2.0.
"""

from __future__ import annotations

import numpy as np

from magicid.faces.types import Face, check_image

POSE_COUNT = 33
POSE_CROP_SIZE = 256  # pose's own input is 256x256: a larger crop costs resize time only
NOSE = 0


class PoseEstimator:
    """Per-person MediaPipe pose. Build once per process (graph load ~0.3 s); ~35 ms a person."""

    def __init__(self, min_confidence: float = 0.5):
        from magicid.faces.offline import import_offline_backend

        _, _, _, mp = import_offline_backend()
        self._pose = mp.solutions.pose.Pose(
            static_image_mode=True, model_complexity=1, min_detection_confidence=min_confidence
        )

    def estimate(self, image: np.ndarray, faces: list[Face]) -> list[np.ndarray | None]:
        """One skeleton per face (same order).

        Args:
            image: uint8 (H, W, 3) RGB.
            faces: the image's faces.

        Returns:
            per face a (33, 3) float32 array `x, y, visibility` (px, px, [0, 1]) or None when the pose found
            no body of that face's person.
        """
        import cv2

        from magicid.imaging.crops import person_box

        image = check_image(image)
        height, width = image.shape[:2]
        skeletons: list[np.ndarray | None] = []
        for face in faces:
            x0, y0, x1, y1 = person_box(face.bbox, width, height)
            side = x1 - x0
            crop = image[y0:y1, x0:x1]
            if side > POSE_CROP_SIZE:
                crop = cv2.resize(crop, (POSE_CROP_SIZE, POSE_CROP_SIZE), interpolation=cv2.INTER_AREA)
            result = self._pose.process(np.ascontiguousarray(crop))
            if result.pose_landmarks is None:
                skeletons.append(None)
                continue
            points = np.array(
                [(p.x * side + x0, p.y * side + y0, p.visibility) for p in result.pose_landmarks.landmark],
                dtype=np.float32,
            )
            fx0, fy0, fx1, fy1 = face.bbox
            grow_x, grow_y = 0.5 * (fx1 - fx0), 0.5 * (fy1 - fy0)
            nose_x, nose_y = points[NOSE, :2]
            own = fx0 - grow_x <= nose_x <= fx1 + grow_x and fy0 - grow_y <= nose_y <= fy1 + grow_y
            skeletons.append(points if own else None)
        return skeletons
