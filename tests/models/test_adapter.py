"""MagicIDAdapter: create (MGMICA installed), encode_identities, safetensors save/load round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from magicid.config import load_params
from magicid.errors import BackboneError, ConfigError
from magicid.models.adapter import CONFIG_NAME, WEIGHTS_NAME, MagicIDAdapter
from magicid.models.mgmica import mgmica_processors


@pytest.fixture()
def params():
    return load_params(None, ["model.n_id_tokens=3"])


def test_create_installs_mgmica_and_encodes_identities(params, fresh_backbone):
    backbone = fresh_backbone
    adapter = MagicIDAdapter.create(backbone, params)
    assert set(mgmica_processors(backbone.unet).values()) == set(adapter.id_projections.values())
    g = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(2, 3, 128, generator=g), dim=-1)
    crops = torch.rand(2, 3, 3, 64, 64, generator=g) * 2 - 1
    tokens = adapter.encode_identities(embeddings, crops)
    assert tokens.shape == (2, 3, 3, backbone.cross_attention_dim)
    with torch.no_grad():
        single = adapter.id_encoder(embeddings[1, 2:3], crops[1, 2:3])
    torch.testing.assert_close(tokens[1, 2:3].detach(), single, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_restores_every_weight(tmp_path, params, tiny_backbone):
    adapter = MagicIDAdapter.create(copy.deepcopy(tiny_backbone), params)
    with torch.no_grad():  # make the weights differ from a fresh adapter's
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    adapter.save(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and json.loads((tmp_path / CONFIG_NAME).read_text())[
        "n_id_tokens"
    ] == 3
    backbone = copy.deepcopy(tiny_backbone)
    loaded = MagicIDAdapter.load(tmp_path, backbone, load_params(None))  # sizes come from the saved config
    assert loaded.n_tokens == 3
    want, got = adapter.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert set(mgmica_processors(backbone.unet).values()) == set(loaded.id_projections.values())


def test_load_refuses_missing_files_and_another_unet(tmp_path, params, tiny_backbone):
    with pytest.raises(BackboneError, match=CONFIG_NAME):
        MagicIDAdapter.load(tmp_path, copy.deepcopy(tiny_backbone), params)
    MagicIDAdapter.create(copy.deepcopy(tiny_backbone), params).save(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["unet"]["block_out_channels"] = [32, 64, 128]  # as if saved from a wider UNet
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="built for a UNet"):
        MagicIDAdapter.load(tmp_path, copy.deepcopy(tiny_backbone), params)


def test_mgmica_path_from_params_reaches_the_processors_on_create_and_load(tmp_path, tiny_backbone):
    """`model.mgmica_path` / `model.mgmica_dense_above` set how every MGMICA layer computes (pipeline, trainer and
    DIIR all build their adapter with `create` or `load`); the saved adapter does not fix them."""
    from magicid.models.mgmica import DENSE_ABOVE, mgmica_context

    assert load_params(None).model.mgmica_dense_above == DENSE_ABOVE  # params.yaml, config and code agree
    dense = load_params(None, ["model.mgmica_path=dense", "model.mgmica_dense_above=0.7"])
    backbone = copy.deepcopy(tiny_backbone)
    adapter = MagicIDAdapter.create(backbone, dense)
    assert (adapter.mgmica_context.path, adapter.mgmica_context.dense_above) == ("dense", 0.7)
    assert mgmica_context(backbone.unet) is adapter.mgmica_context
    adapter.save(tmp_path)
    gather = load_params(None, ["model.mgmica_path=gather"])
    loaded = MagicIDAdapter.load(tmp_path, copy.deepcopy(tiny_backbone), gather)
    assert (loaded.mgmica_context.path, loaded.mgmica_context.dense_above) == ("gather", DENSE_ABOVE)
    with pytest.raises(ConfigError, match="mgmica_path"):
        load_params(None, ["model.mgmica_path=sparse"])
