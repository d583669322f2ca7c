from pathlib import Path

import pytest

from magicid.config import Params, load_params
from magicid.errors import ConfigError


def test_params_yaml_loads_and_matches_defaults(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)
    assert params.model.backbone == "models/offline_world"  # the shipped offline world
    assert params.train.init_from == "champion"
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


# --- issue 11, item 4: values that make no sense fail at load, with a short message naming the key ---------
@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=true", "train.steps"),
        ("data.split.train=1.5", "data.split.train"),
        ("data.split.val=-0.1", "data.split.val"),
        ("data.split={train: 0.5, val: 0.1, test: 0.1}", "split fractions must sum to 1"),
        ("faces.tiles=[0, 3]", "faces.tiles"),
        ("faces.tiles=[true, 2]", "faces.tiles"),
        ("model.guidance_scale=.inf", "model.guidance_scale"),
        ("diir.guidance_scale=.nan", "diir.guidance_scale"),
        ("model.id_scale=-1", "model.id_scale"),
        ("data.sample_scales=[1.0, -0.5]", "data.sample_scales"),
        ("model.num_inference_steps=5000", "model.num_inference_steps"),
        ("diir.num_inference_steps=1001", "diir.num_inference_steps"),
        ("seed=18446744073709551616", "seed"),
        ("seed=-1", "seed"),
        ("eval.seeds=[0, 99999999999999999999]", "eval.seeds"),
        ("train.mmf.schedule=[{mode: fused, steps: true}]", "train.mmf.schedule.0.steps"),
    ],
)
def test_nonsense_values_fail_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_params(None, [override])
    assert key in str(info.value)
    assert len(str(info.value)) < 500


@pytest.mark.parametrize(
    "override", ["model.resolution=[unclosed", "model.resolution={a: b", "seed=*a", "x", "=1"]
)
def test_malformed_overrides_are_short_config_errors(override):
    with pytest.raises(ConfigError) as info:
        load_params(None, [override])
    assert len(str(info.value)) < 500


def test_yaml_alias_bomb_is_refused_in_a_few_hundred_bytes_of_error(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [{', '.join(['*' + previous] * 9)}]")
    bomb = "\n".join(lines).replace("a: &a", "seed: &a", 1) + "\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    with pytest.raises(ConfigError, match="aliases") as info:
        load_params(path)
    assert len(str(info.value)) < 1000


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  steps: 10\n  steps: 20\n")
    with pytest.raises(ConfigError, match="duplicate key 'steps'"):
        load_params(path)


def test_binary_params_file_is_a_short_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a text") as info:
        load_params(path)
    assert len(str(info.value)) < 300


def test_long_wrong_values_are_quoted_short(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_params(None, ["model.backbone=[" + ", ".join(["x" * 50] * 1000) + "]"])
    assert len(str(info.value)) < 500


def test_valid_bounds_still_load():
    params = load_params(None, ["seed=9223372036854775807", "data.split={train: 1, val: 0, test: 0}"])
    assert params.seed == 2**63 - 1


# --- issue 27, item 8: store URLs, nesting and size limits -----------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        ("tracking.uri=foo://x", "tracking.uri"),
        ("tracking.uri=http://", "tracking.uri"),
        ("tracking.artifact_root=foo://bucket", "tracking.artifact_root"),
        ("review.db_url=bogus://", "review.db_url"),
        ("review.db_url=reviews.db", "review.db_url"),
        ("storage.root=gs://bucket", "storage.root"),
        ("storage.s3_endpoint_url=localhost:9000", "storage.s3_endpoint_url"),
        ("tracking.experiment=" + "e" * 501, "tracking.experiment"),
        ("model.backbone=" + "b" * 4097, "model.backbone"),
    ],
)
def test_store_urls_and_long_strings_fail_at_load(override, key):
    with pytest.raises(ConfigError) as info:
        load_params(None, [override])
    assert key in str(info.value) and len(str(info.value)) < 600


def test_supported_store_urls_load():
    params = load_params(
        None,
        [
            "tracking.uri=postgresql+psycopg2://mlflow@db:5432/mlflow",
            "tracking.artifact_root=s3://bucket/mlflow",
            "review.db_url=mysql+pymysql://reviews@db/reviews",
            "storage.root=s3://bucket/data",
            "storage.s3_endpoint_url=http://127.0.0.1:9000",
        ],
    )
    assert params.tracking.uri.startswith("postgresql+psycopg2://")


def test_nesting_is_limited_before_the_parser_recurses(tmp_path):
    with pytest.raises(ConfigError, match="nested 17 levels deep"):
        load_params(None, ["eval.prompts=" + "[" * 17 + "]" * 17])
    path = tmp_path / "deep.yaml"
    path.write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: lists or mappings nested thousands"):
        load_params(path)


def test_an_override_longer_than_a_params_file_is_refused_quoted_short():
    with pytest.raises(ConfigError, match="longer than a whole parameter file") as info:
        load_params(None, ["model.backbone=" + "x" * (2 << 20)])
    assert len(str(info.value)) < 300
