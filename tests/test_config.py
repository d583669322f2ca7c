from pathlib import Path

import pytest

from magicid.config import Params, load_params
from magicid.errors import ConfigError


def test_params_yaml_loads_and_matches_defaults(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)
    assert params.model.backbone == "tiny"
    assert params.faces.backend == "offline"


def test_missing_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: parameter file not found"):
        load_params(missing)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model:\n  resolutoin: 128\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert "model.resolutoin: unknown key" in str(info.value)
    assert str(path) in str(info.value)


def test_wrong_type_names_key_and_value(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert "train.steps" in str(info.value) and "'many'" in str(info.value)


def test_resolution_must_divide_by_64(tmp_path):
    with pytest.raises(ConfigError, match="model.resolution: .*multiple of 64"):
        load_params(None, ["model.resolution=100"])


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(path)


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_overrides_apply_with_yaml_types(repo_root):
    params = load_params(
        repo_root / "params.yaml",
        ["model.resolution=128", "diir.buckets=[64, 128]", "faces.insightface_root=/models", "seed=7"],
    )
    assert params.model.resolution == 128
    assert params.diir.buckets == [64, 128]
    assert params.faces.insightface_root == "/models"
    assert params.seed == 7


def test_override_of_nested_section(repo_root):
    params = load_params(repo_root / "params.yaml", ["train.clone_face.k_max=6"])
    assert params.train.clone_face.k_max == 6


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.nosuch=1", "unknown key 'model.nosuch'"),
        ("nosuch.key=1", "unknown key 'nosuch.key'"),
        ("model.resolution", "expected the form section.key=value"),
        ("seed.x=1", "seed is not a section"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_params(None, [override])


def test_override_type_error_is_reported():
    with pytest.raises(ConfigError, match="model.dtype"):
        load_params(None, ["model.dtype=float64"])


def test_cross_field_rule_clone_face():
    with pytest.raises(ConfigError, match="k_min"):
        load_params(None, ["train.clone_face.k_min=5", "train.clone_face.k_max=2"])


def test_defaults_only_needs_no_file():
    assert load_params(None).seed == 0


def test_params_file_is_not_modified_by_overrides(repo_root, tmp_path):
    text = (repo_root / "params.yaml").read_text()
    copy = tmp_path / "params.yaml"
    copy.write_text(text)
    load_params(copy, ["model.resolution=128"])
    assert Path(copy).read_text() == text
