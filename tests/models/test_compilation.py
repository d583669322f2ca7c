"""`model.compile` / `train.compile` / `fit.compile` (torch.compile, `magicid.models.compilation`): a compiled
generation equals the eager one within float tolerance with MGMICA identities, MGMICA stays local inside a compiled
UNet (its layers run eager: one graph break each), and an unsupported setup stops with an error instead of running
eager. The compiling tests are slow (inductor compiles the tiny UNet and ControlNet: ~30-60 s on 2 shared cores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_settings import TINY_BACKBONE

from magicid.config import load_params
from magicid.errors import ConfigError
from magicid.models.adapter import MagicIDAdapter
from magicid.models.compilation import CompileUnsupportedError, compile_denoiser, is_compiled
from magicid.models.mgmica import mgmica_processors, resize_masks
from magicid.models.pipeline import MagicIDPipeline

SIDE, STEPS = 64, 2
BOXES = [(6, 10, 28, 34), (36, 10, 58, 34)]


def _params(*overrides: str):
    return load_params(None, [*TINY_BACKBONE, f"model.resolution={SIDE}", *overrides])


def _adapter(backbone, params) -> MagicIDAdapter:
    """A fresh adapter whose zero-initialised ControlNet outputs and copied ID projections are perturbed, so the
    layout and the identities both move the image."""
    adapter = MagicIDAdapter.create(backbone, params).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*adapter.controlnet.parameters(), *adapter.id_projections.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return adapter


def _identities(seed: int, dim: int) -> list[np.ndarray]:
    vectors = np.random.default_rng(seed).standard_normal((2, dim)).astype(np.float32)
    return list(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


def _without_cxx():
    """Inductor's C++ compiler search pointed at a name that is on no PATH (a CPU machine without g++)."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch({"cpp.cxx": ("magicid-test-no-such-cxx",)})


@pytest.fixture()
def no_cxx():
    with _without_cxx():
        yield


def test_unsupported_cpu_setup_stops_with_an_error_before_compiling(fresh_backbone, no_cxx):
    params = _params("model.compile=unet")
    adapter = _adapter(fresh_backbone, params)
    with pytest.raises(
        CompileUnsupportedError, match=r"model.compile=unet.*C\+\+ compiler.*model.compile=none"
    ):
        MagicIDPipeline.from_backbone(fresh_backbone, adapter, params)
    assert not is_compiled(fresh_backbone.unet) and not is_compiled(adapter.controlnet)
    with pytest.raises(CompileUnsupportedError, match="train.compile=unet"):
        compile_denoiser("unet", "train.compile", fresh_backbone.unet, adapter.controlnet)
    # `none` never needs a compiler: nothing is compiled and nothing is checked.
    assert compile_denoiser("none", "model.compile", fresh_backbone.unet, adapter.controlnet) == []
    assert not is_compiled(fresh_backbone.unet)


def test_settings_are_typed_and_unknown_values_refused():
    assert _params().model.compile == "none" and _params().train.compile == "none"
    assert _params("fit.compile=unet").fit.compile == "unet"
    with pytest.raises(ConfigError):
        _params("model.compile=everything")
    with pytest.raises(ConfigError):
        _params("train.compile=all")  # training compiles the denoiser only
    with pytest.raises(ConfigError, match="model.compile=fast"):
        compile_denoiser("fast", "model.compile", torch.nn.Linear(1, 1))


def test_cuda_graphs_are_for_the_fit_on_cuda_only(fresh_backbone):
    assert _params("fit.compile=unet_cudagraphs").fit.compile == "unet_cudagraphs"
    with pytest.raises(ConfigError):
        _params("model.compile=unet_cudagraphs")
    with pytest.raises(
        CompileUnsupportedError, match="fit.compile=unet_cudagraphs: CUDA graphs need the model on CUDA"
    ):
        compile_denoiser("unet_cudagraphs", "fit.compile", fresh_backbone.unet)
    assert not is_compiled(fresh_backbone.unet)


def test_compile_settings_are_not_part_of_the_fit_keys():
    from magicid.training.fit import fit_key

    params = _params()
    eager = fit_key(params, params.fit, "v1")["key"]
    compiled = _params("fit.compile=unet")
    assert fit_key(compiled, compiled.fit, "v1")["key"] == eager


def _first_attn2_capture(unet: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every MGMICA layer call, in call order (hooks registered before compiling)."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    modules = dict(unet.named_modules())
    for name in mgmica_processors(unet):
        modules[name.removesuffix(".processor")].register_forward_hook(
            lambda module, args, output: calls.append((args[0].clone(), output.clone()))
        )
    return calls


@pytest.mark.slow
@torch.inference_mode()
def test_compiled_generation_equals_eager_and_mgmica_stays_local(fresh_backbone):
    params = _params("model.compile=unet")
    adapter = _adapter(fresh_backbone, params)
    unet = fresh_backbone.unet
    calls = _first_attn2_capture(unet)
    dim = params.model.id_embed_dim
    common = dict(layout=BOXES, height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=5.0,
                  output_type="np")  # fmt: skip

    def generate(pipe, identities):
        calls.clear()
        out = pipe("a photo of two people", identities=identities, generator=torch.Generator().manual_seed(0),
                   **common)  # fmt: skip
        return out.images[0], out.face_masks, [(i, o) for i, o in calls]

    eager_pipe = MagicIDPipeline.from_backbone(fresh_backbone, adapter, _params())
    eager_pipe.set_progress_bar_config(disable=True)
    eager, _, _ = generate(eager_pipe, _identities(0, dim))
    assert not is_compiled(unet)

    pipe = MagicIDPipeline.from_backbone(fresh_backbone, adapter, params)
    pipe.set_progress_bar_config(disable=True)
    assert (
        is_compiled(unet) and is_compiled(adapter.controlnet) and not is_compiled(fresh_backbone.vae.decoder)
    )
    generate(pipe, _identities(0, dim))  # warm-up: the first calls compile (and recompile once, see below)
    compiled, masks, before = generate(pipe, _identities(0, dim))
    again, _, _ = generate(pipe, _identities(0, dim))
    assert np.array_equal(compiled, again), "a compiled generation is not repeatable with the same seed"
    # Inductor reorders float32 arithmetic: equal within tolerance, not bit for bit (measured max ~5e-6).
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
    # The first MGMICA layer of the first step sees the same input whatever the identities; changing identity 1
    # changes its output only inside identity 1's mask cells (the conditional CFG half, row 1), as in eager.
    changed = _identities(0, dim)
    changed[1] = _identities(7, dim)[1]
    _, _, after = generate(pipe, changed)
    (in_before, out_before), (in_after, out_after) = before[0], after[0]
    assert torch.equal(in_before, in_after)
    proc = next(iter(mgmica_processors(unet).values()))
    grid = proc.context.grid(in_before.shape[1])
    outside = (resize_masks(torch.from_numpy(masks)[None], grid)[0, 1] == 0).flatten()
    assert outside.any() and not outside.all()
    assert torch.equal(out_before[1, outside], out_after[1, outside])
    assert not torch.equal(out_before[1, ~outside], out_after[1, ~outside])
    assert torch.equal(out_before[0], out_after[0])  # the unconditional half: the null identity, unchanged


@pytest.mark.slow
def test_mgmica_layers_are_the_only_graph_breaks(fresh_backbone):
    """torch._dynamo.explain on the UNet with identities set: every break is the disabled MGMICA processor call
    (a break inside a nested module splits each enclosing frame too: the tiny UNet's 6 layers give 19), and with
    the stock processors the UNet is one graph."""
    import torch._dynamo
    from diffusers.models.attention_processor import AttnProcessor2_0

    from magicid.models.mgmica import set_identities

    params = _params()
    MagicIDAdapter.create(fresh_backbone, params)  # installs MGMICA on the UNet
    unet = fresh_backbone.unet.eval()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, fresh_backbone.cross_attention_dim, generator=g)
    masks = torch.zeros(2, 2, 8, 8)
    masks[:, 0, :4, :4] = masks[:, 1, 4:, 4:] = 1.0
    set_identities(unet, torch.randn(2, 2, 4, fresh_backbone.cross_attention_dim, generator=g), masks)
    assert len(mgmica_processors(unet)) == 6
    with torch.no_grad():
        explained = torch._dynamo.explain(unet)(latents, 500, encoder_hidden_states=text)
        reasons = [str(b.reason) for b in explained.break_reasons]
        assert explained.graph_break_count > 0 and reasons
        assert all("MGMICAAttnProcessor.__call__" in r for r in reasons), reasons
        unet.set_attn_processor(AttnProcessor2_0())
        stock = torch._dynamo.explain(unet)(latents, 500, encoder_hidden_states=text)
        torch._dynamo.reset()
    assert stock.graph_break_count == 0 and stock.graph_count == 1


def test_train_compile_compiles_the_denoiser_in_place_and_refuses_an_unsupported_setup(tmp_path):
    from magicid.training.synthetic import write_synthetic_idzoom
    from magicid.training.trainer import _build_models, train

    params = load_params(None, [*TINY_BACKBONE, "model.resolution=64", "model.id_crop_size=32",
                                "train.compile=unet", f"train.out_dir={tmp_path / 'run'}"])  # fmt: skip
    root = write_synthetic_idzoom(tmp_path / "v1", n_images=2, crop_size=64, seed=0)
    with _without_cxx(), pytest.raises(CompileUnsupportedError, match="train.compile=unet"):
        train(params, root, progress=False, track=False)
    backbone, module, _, _ = _build_models(params, None, torch.device("cpu"), "no", init=False)
    # Compiled lazily (nothing runs here) and in place: the module's state-dict keys are the eager ones.
    assert is_compiled(backbone.unet) and is_compiled(module.adapter.controlnet)
    assert not any("_orig_mod" in key for key in module.state_dict())


def test_diir_compiles_what_model_compile_names(fresh_backbone):
    from magicid.restore.diir import DIIR

    params = _params("model.compile=all")
    adapter = _adapter(fresh_backbone, params)
    with _without_cxx(), pytest.raises(CompileUnsupportedError, match="model.compile=all"):
        DIIR.from_backbone(fresh_backbone, adapter=adapter, params=params)
    DIIR.from_backbone(fresh_backbone, adapter=adapter, params=params)  # compiled lazily: nothing runs here
    vae = fresh_backbone.vae
    assert all(is_compiled(m) for m in (fresh_backbone.unet, adapter.controlnet, vae.encoder, vae.decoder))
    assert not is_compiled(fresh_backbone.text_encoder)
