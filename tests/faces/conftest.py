"""Face fixtures: the offline analyzer and the package photos, loaded once per session."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def faces_params():
    from magicid.config import FacesParams

    return FacesParams()


@pytest.fixture(scope="session")
def analyzer(faces_params):
    from magicid.faces import get_analyzer

    return get_analyzer(faces_params)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="session")
def t1() -> np.ndarray:
    from magicid.data.sample import package_photo

    return np.asarray(Image.open(package_photo("t1.jpg")).convert("RGB"))


@pytest.fixture(scope="session")
def hanks() -> np.ndarray:
    from magicid.data.sample import package_photo

    return np.asarray(Image.open(package_photo("Tom_Hanks_54745.png")).convert("RGB"))


@pytest.fixture(scope="session")
def astronaut_faces(analyzer, astronaut):
    return analyzer.analyze(astronaut)


@pytest.fixture(scope="session")
def t1_faces(analyzer, t1):
    return analyzer.analyze(t1)
