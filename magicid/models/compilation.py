"""`torch.compile` for the denoiser (UNet, MMF ControlNet) and the VAE: an opt-in speed option (issue 25).

Settings (`model.compile` for generation and DIIR, `train.compile` for the adapter trainer, `fit.compile` for the
backbone fitter's UNet phase):

- `none` (default): eager, as before;
- `unet`: the UNet and the MMF ControlNet (the modules a denoising step runs);
- `all` (`model.compile` only): also the VAE's encoder and decoder;
- `unet_cudagraphs` (`fit.compile` only, CUDA only): the UNet with inductor's `mode="reduce-overhead"`, which
  replays its kernels as CUDA graphs (one launch for many): for the fit's tiny UNet, whose steps on a GPU are bound
  by launching many small kernels; the caller marks each step (`torch.compiler.cudagraph_mark_step_begin`).

How: `nn.Module.compile()` in place (inductor, default mode), so state-dict keys, `.to()`, saving and loading are
unchanged (`torch.compile(module)` would wrap it and prefix every key with `_orig_mod.`). A module already compiled
is left as it is (compiling again would throw the compiled graphs away). The first calls are slow: inductor
compiles one graph per input shape/grad mode it meets (measured on 2 shared CPU cores, tiny backbone: ~25-50 s for
a generation, ~160 s for a fit's first training step; README "On a GPU").

MGMICA runs eager inside a compiled UNet: `MGMICAAttnProcessor.__call__` is `torch.compiler.disable`d (its per-call
hooks on `to_q` / `to_out[0]` and its data-dependent gather make dynamo fail: torch 2.13 stops in
`adaptive_avg_pool2d` on symbolic mask shapes). Each MGMICA layer is then a graph break, and since dynamo cannot
resume inside a loop, the frames whose loop holds one (the UNet's forward, its cross-attention blocks, the
Transformer2D blocks) run eager and dynamo compiles the modules they call, one frame each: the resnets, down- and
upsamplers, the transformer blocks before and after their cross-attention (measured, SD 1.5's UNet with MGMICA,
backend "eager": 56 frames, 25 recompiles; the tiny UNet: 19 breaks). The ControlNet (stock processors) compiles
as one graph, and so does the UNet without MGMICA. The processor's arithmetic is unchanged, so locality and the
scale-0 equality hold as in eager.

Recompiles: those frames are shared by every module of a class (ResnetBlock2D.forward is one code object), so each
distinct (channels, resolution) recompiles it; SD 1.5's UNet needs 13 variants of it, past dynamo's default limit of
8, after which the rest would run eager with only a logged warning. `compile_denoiser` therefore raises
`torch._dynamo.config.recompile_limit` to `RECOMPILE_LIMIT` (64; process-wide, only when compiling is asked for).

No silent fallback: inductor needs a C++ compiler on CPU and Triton on CUDA; `check_compile_supported` stops with
a `CompileUnsupportedError` that says what is missing, rather than letting the first call fail deep inside torch
or run eager. New input shapes (another resolution, batch, DIIR bucket) compile again on their first call.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from magicid.errors import ConfigError

__all__ = [
    "COMPILE_SETTINGS",
    "RECOMPILE_LIMIT",
    "CompileUnsupportedError",
    "check_compile_supported",
    "compile_denoiser",
    "compile_module",
    "is_compiled",
]

COMPILE_SETTINGS = ("none", "unet", "all", "unet_cudagraphs")
# Enough for SD 1.5's distinct block shapes in generation, CFG and training together (module docstring).
RECOMPILE_LIMIT = 64


class CompileUnsupportedError(ConfigError):
    """A `*.compile` setting asks for torch.compile where inductor cannot run (no C++ compiler, no Triton)."""


def _cpu_compiler_candidates() -> list[str]:
    """The C++ compilers inductor would try on CPU (`torch._inductor.config.cpp.cxx`, from $CXX or g++)."""
    import torch._inductor.config as inductor_config

    cxx = inductor_config.cpp.cxx
    return [name for name in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if name]


def check_compile_supported(device: torch.device, setting_name: str) -> None:
    """Stop unless torch.compile (inductor) can run on `device`.

    Args:
        device: where the compiled modules run.
        setting_name: the setting that asked for it (e.g. `model.compile=unet`), named in the error.

    Raises:
        CompileUnsupportedError: CPU without any of inductor's C++ compilers on PATH; CUDA without Triton; any
            other device type.
    """
    if device.type == "cpu":
        candidates = _cpu_compiler_candidates()
        if not any(shutil.which(name) for name in candidates):
            raise CompileUnsupportedError(
                f"{setting_name}: torch.compile on CPU needs a C++ compiler for inductor, and none of "
                f"{', '.join(candidates) or '(none configured)'} is on PATH; install g++ (or set CXX), or use "
                f"{setting_name.split('=')[0]}=none"
            )
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CompileUnsupportedError(
                f"{setting_name}: torch.compile on CUDA needs Triton, which this torch ({torch.__version__}) cannot "
                f"import; install the triton matching torch, or use {setting_name.split('=')[0]}=none"
            )
    else:
        raise CompileUnsupportedError(
            f"{setting_name}: torch.compile is supported here on cpu and cuda only, not {device.type}; use "
            f"{setting_name.split('=')[0]}=none"
        )


def is_compiled(module: nn.Module) -> bool:
    """Whether `nn.Module.compile()` has been applied to `module` (its calls go through the compiled graph)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_module(module: nn.Module, mode: str | None = None) -> bool:
    """`module.compile(mode=mode)` unless already compiled; True when it compiled it now."""
    if is_compiled(module):
        return False
    module.compile(mode=mode)
    return True


def compile_denoiser(
    setting: str,
    setting_name: str,
    unet: nn.Module,
    controlnet: nn.Module | None = None,
    vae: nn.Module | None = None,
) -> list[str]:
    """Apply a `*.compile` setting to the modules of a denoising step (in place).

    Args:
        setting: `none`, `unet` (UNet + ControlNet), `all` (also the VAE's encoder and decoder) or
            `unet_cudagraphs` (as `unet`, CUDA graphs: CUDA only).
        setting_name: the config key it came from (`model.compile`), for errors.
        unet: the diffusers UNet (MGMICA processors, if installed, stay eager).
        controlnet: the MMF ControlNet, or None.
        vae: the `AutoencoderKL`, or None (only read for `all`).

    Returns:
        The names of the modules compiled by this call (`unet`, `controlnet`, `vae.encoder`, `vae.decoder`).

    Raises:
        ConfigError: an unknown setting. CompileUnsupportedError: see `check_compile_supported`; CUDA graphs
            asked for off CUDA.
    """
    if setting not in COMPILE_SETTINGS:
        raise ConfigError(f"{setting_name}={setting}: use one of {', '.join(COMPILE_SETTINGS)}")
    if setting == "none":
        return []
    device = next(unet.parameters()).device
    check_compile_supported(device, f"{setting_name}={setting}")
    mode = None
    if setting == "unet_cudagraphs":
        if device.type != "cuda":
            raise CompileUnsupportedError(
                f"{setting_name}={setting}: CUDA graphs need the model on CUDA, it is on {device.type}; use "
                f"{setting_name}=unet (or none)"
            )
        mode = "reduce-overhead"
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    targets: list[tuple[str, nn.Module]] = [("unet", unet)]
    if controlnet is not None:
        targets.append(("controlnet", controlnet))
    if setting == "all" and vae is not None:
        targets += [("vae.encoder", vae.encoder), ("vae.decoder", vae.decoder)]
    return [name for name, module in targets if compile_module(module, mode)]
