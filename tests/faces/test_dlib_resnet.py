"""dlib's face-recognition ResNet in PyTorch: same descriptors as dlib, file errors, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from magicid.errors import FaceBackendError
from magicid.faces.dlib_resnet import DlibFaceResNet, default_model_path, read_dlib_resnet

DESCRIPTOR_TOLERANCE = 1e-4  # max abs difference to dlib's raw descriptor (observed: ~4e-7)


@pytest.fixture(scope="module")
def descriptor_net() -> DlibFaceResNet:
    return DlibFaceResNet.from_dat()


@pytest.fixture(scope="module")
def dlib_recognizer():
    import dlib

    return dlib.face_recognition_model_v1(str(default_model_path()))


def _shapes(analyzer, faces):
    import dlib

    shapes = dlib.full_object_detections()
    for face in faces:
        shapes.append(analyzer._dlib_shape(face))
    return shapes


@pytest.mark.parametrize("photo", ["astronaut", "t1"])
def test_descriptors_equal_dlibs(request, analyzer, descriptor_net, dlib_recognizer, photo, capsys):
    image = request.getfixturevalue(photo)
    faces = request.getfixturevalue(f"{photo}_faces")
    shapes = _shapes(analyzer, faces)
    reference = np.array([np.asarray(d) for d in dlib_recognizer.compute_face_descriptor(image, shapes)])
    ours = descriptor_net.describe_faces(image, shapes)
    difference = float(np.abs(ours - reference).max())
    with capsys.disabled():
        print(f"\n[dlib_resnet] {photo}: {len(faces)} faces, max |torch - dlib| = {difference:.2e}")
    assert ours.shape == (len(faces), 128) and ours.dtype == np.float32
    assert difference <= DESCRIPTOR_TOLERANCE
    # Raw, like dlib: the caller normalises.
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(reference, axis=1), rtol=1e-5)


def test_batched_forward_equals_one_by_one(analyzer, descriptor_net, t1, t1_faces):
    import dlib

    chips = np.stack(dlib.get_face_chips(t1, _shapes(analyzer, t1_faces), size=150, padding=0.25))
    with torch.inference_mode():
        batched = descriptor_net(torch.from_numpy(chips))
        one_by_one = torch.cat([descriptor_net(torch.from_numpy(chip[None])) for chip in chips])
        channels_first = descriptor_net(torch.from_numpy(chips).permute(0, 3, 1, 2).float())
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(channels_first, batched, atol=1e-5, rtol=0)


def test_descriptors_do_not_depend_on_the_thread_count(analyzer, descriptor_net, t1, t1_faces):
    """Bit-identical on 1 and 2 threads: a build by 1-thread workers equals an in-process one."""
    shapes = _shapes(analyzer, t1_faces)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = descriptor_net.describe_faces(t1, shapes)
        assert torch.get_num_threads() == 2  # restored after the single-thread forward
        torch.set_num_threads(1)
        one = descriptor_net.describe_faces(t1, shapes)
    finally:
        torch.set_num_threads(previous)
    assert np.array_equal(one, two)


def test_no_face_gives_empty_descriptors(descriptor_net, astronaut):
    assert descriptor_net.describe_faces(astronaut, []).shape == (0, 128)


def test_wrong_chip_shape_is_rejected(descriptor_net):
    from magicid.errors import ModelInputError

    with pytest.raises(ModelInputError, match="150"):
        descriptor_net(torch.zeros(1, 112, 112, 3, dtype=torch.uint8))


def test_weights_are_parsed_once():
    assert read_dlib_resnet() is read_dlib_resnet(default_model_path())


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: data[:4096], id="truncated-in-first-layer"),
        pytest.param(lambda data: data + b"\x00", id="trailing-bytes"),
        pytest.param(lambda data: bytes(range(256)) * 64, id="garbage"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_bad_file_raises_naming_it(tmp_path: Path, corrupt):
    bad = tmp_path / "broken_resnet.dat"
    bad.write_bytes(corrupt(default_model_path().read_bytes()))
    with pytest.raises(FaceBackendError, match="broken_resnet.dat"):
        DlibFaceResNet.from_dat(bad)


def test_missing_file_raises_naming_it(tmp_path: Path):
    with pytest.raises(FaceBackendError, match="absent.dat"):
        read_dlib_resnet(tmp_path / "absent.dat")


def test_other_dlib_model_is_rejected(tmp_path: Path):
    """A valid dlib file of another kind (the 5-point shape predictor) is not mistaken for the ResNet."""
    import face_recognition_models

    with pytest.raises(FaceBackendError, match="not dlib's face-recognition ResNet"):
        read_dlib_resnet(face_recognition_models.pose_predictor_five_point_model_location())
