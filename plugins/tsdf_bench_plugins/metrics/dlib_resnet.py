"""dlib's ResNet face-recognition network, run in PyTorch with the weights of the installed model file.

The network is Davis King's 128-d face descriptor model (``dlib_face_recognition_resnet_model_v1.dat``,
the one :class:`~tsdf_bench_plugins.metrics.identity.DlibFaceEmbedder` runs through
``dlib.face_recognition_model_v1``).  The file ships inside the installed ``face-recognition-models``
package (CC0 licence file; its metadata's classifier says MIT): this module reads the weights from
that file and nothing is downloaded.  It exists because ``dlib-bin`` is built without BLAS, so dlib
itself spends ~80 ms per face on one core; PyTorch's convolutions are several times faster and give
the same descriptors up to float32 rounding.

Architecture (dlib's ``anet_type`` in ``tools/python/src/face_recognition.cpp``, innermost first)::

    input_rgb_image_sized<150>     (pixel - mean_rgb) / 256, channels R, G, B
    con 32 7x7 /2 (no padding), affine, relu, max_pool 3x3 /2 (no padding)
    14 residual blocks: 3 x 32; 64 down + 3 x 64; 128 down + 2 x 128; 256 down + 2 x 256; 256 down
    avg_pool_everything, fc_no_bias 128          (loss_metric adds nothing at inference)

A block is ``relu(x' + affine(con3x3(relu(affine(con3x3/s(x))))))`` where ``x' = x``, or for a
down block (stride 2, no padding) ``x' = avg_pool 2x2 /2 (x)``.  dlib's ``add_prev`` sums tensors
of different shapes by zero-padding both to the larger size in every dimension: the shortcut gets
zero channels, and at the 8->4 and 4->2 down blocks the branch's smaller map (3x3, 1x1) is padded
at the bottom/right.  ``affine`` is dlib's inference form of batch norm (per channel ``g * x + b``);
it is folded into the preceding convolution when the torch module is built.

dlib's file format, as read here (dlib's ``serialize.h``, ``dnn/core.h``, ``dnn/layers.h``,
``dnn/input.h``, ``cuda/tensor.h``): an integer is a control byte (bit 7: negative, low 4 bits:
number of bytes) and that many little-endian magnitude bytes; a float is two integers, mantissa
and exponent, worth ``mantissa * 2**exponent``; a string is its length and its bytes; a bool is
``'0'``/``'1'``.  A tensor is version 2, four dimensions, then raw little-endian float32; an
alias tensor (a view into a layer's ``params``) is version 1 and four dimensions.  The network
nests: the loss layer's version and details, then the version of every layer wrapper from the
output down to the input, then, from the input up, each layer's details (name-with-version string
and fields) followed by its wrapper's bookkeeping (three bools and two or three scratch tensors).

Public API: :func:`read_dat` (parse),
:class:`DlibResNet` (the module), :func:`load_model`, :func:`descriptors`, :func:`default_dat_path`.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tsdf_bench.errors import TsdfBenchError

CHIP_SIZE = 150
DESCRIPTOR_SIZE = 128
REINSTALL_HINT = "reinstall it: pip install --force-reinstall --no-deps face-recognition-models"

# (output channels, downsamples) of the 14 residual blocks, input to output
BLOCKS = ((32, False),) * 3 + ((64, True),) + ((64, False),) * 3 + ((128, True),) + ((128, False),) * 2 \
    + ((256, True),) + ((256, False),) * 2 + ((256, True),)

_FLOAT32 = np.dtype("<f4")


class _Corrupt(Exception):
    """The file does not hold what this network's serialization should (turned into a TsdfBenchError)."""


# -- dlib's serialization primitives ---------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> int:
        start = self.pos
        if start + n > len(self.data):
            raise _Corrupt(f"the file ends after {len(self.data)} bytes, {start + n - len(self.data)} short")
        self.pos = start + n
        return start

    def int(self) -> int:
        ctrl = self.data[self._take(1)]
        size = ctrl & 0x0F
        if ctrl & 0x70 or not 1 <= size <= 8:
            raise _Corrupt(f"byte 0x{ctrl:02x} is not an integer's control byte")
        start = self._take(size)
        value = int.from_bytes(self.data[start:start + size], "little")
        return -value if ctrl & 0x80 else value

    def float(self) -> float:
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise _Corrupt("a float in dlib's old text format (not used by this model)")
        mantissa, exponent = self.int(), self.int()
        if not -32768 <= exponent < 32000:  # 32000-32002: dlib's codes for inf, -inf, nan
            raise _Corrupt(f"a float with exponent {exponent}")
        try:
            value = math.ldexp(mantissa, exponent)
        except OverflowError:
            value = math.inf
        if not abs(value) <= np.finfo(np.float32).max:
            raise _Corrupt(f"a float out of float32's range ({mantissa} * 2**{exponent})")
        return float(np.float32(value))

    def bool(self) -> bool:
        ch = self.data[self._take(1)]
        if ch not in (0x30, 0x31):
            raise _Corrupt(f"byte 0x{ch:02x} is not a bool ('0' or '1')")
        return ch == 0x31

    def string(self) -> str:
        n = self.int()
        if n > 256:
            raise _Corrupt(f"a string of {n} bytes where a layer name was expected")
        start = self._take(n)
        return self.data[start:start + n].decode("latin-1")

    def name(self, *allowed: str) -> str:
        at = self.pos
        got = self.string()
        if got not in allowed:
            raise _Corrupt(f"found {got!r} at byte {at} where dlib writes {' or '.join(map(repr, allowed))}")
        return got

    def expect(self, what: str, allowed) -> int:
        at = self.pos
        got = self.int()
        if got not in allowed:
            raise _Corrupt(f"{what} is {got} (byte {at}), expected {' or '.join(map(str, allowed))}")
        return got

    def dims(self) -> tuple[int, int, int, int]:
        dims = tuple(self.int() for _ in range(4))
        if min(dims) < 0 or math.prod(dims) > len(self.data):
            raise _Corrupt(f"impossible tensor dimensions {dims}")
        return dims

    def tensor(self) -> np.ndarray:
        """dlib's resizable_tensor: version 2, (num_samples, k, nr, nc), little-endian float32."""
        self.expect("a tensor's version", (2,))
        dims = self.dims()
        count = math.prod(dims)
        start = self._take(4 * count)
        return np.frombuffer(self.data, dtype=_FLOAT32, count=count, offset=start).reshape(dims)

    def alias(self) -> tuple[int, int, int, int]:
        """dlib's alias_tensor (a view into params): version 1, (num_samples, k, nr, nc)."""
        self.expect("an alias tensor's version", (1,))
        return self.dims()


# -- the network's layers, as dlib serializes them -------------------------------------------------
def _layer_plan() -> list[tuple]:
    """The layers from the input up: ``(kind, fields)``; tag/skip layers are wrappers without details."""
    plan = [("con", dict(n=32, size=7, stride=2, pad=0, cin=3, key="stem.conv")), ("affine", "stem.affine"),
            ("relu",), ("max_pool", (3, 3, 2, 2, 0, 0))]
    cin = 32
    for i, (n, down) in enumerate(BLOCKS):
        s, p = (2, 0) if down else (1, 1)
        plan += [("tag",), ("con", dict(n=n, size=3, stride=s, pad=p, cin=cin, key=f"blocks.{i}.conv1")),
                 ("affine", f"blocks.{i}.affine1"), ("relu",),
                 ("con", dict(n=n, size=3, stride=1, pad=1, cin=n, key=f"blocks.{i}.conv2")),
                 ("affine", f"blocks.{i}.affine2")]
        if down:
            plan += [("tag",), ("skip",), ("avg_pool", (2, 2, 2, 2, 0, 0))]
        plan += [("add_prev",), ("relu",)]
        cin = n
    plan += [("avg_pool", (0, 0, 1, 1, 0, 0)), ("fc", dict(n=DESCRIPTOR_SIZE, cin=cin, key="fc"))]
    return plan


def expected_shapes() -> dict[str, tuple]:
    """Name -> shape of every tensor :func:`read_dat` returns."""
    shapes = {"input.mean": (3,)}
    for kind, *fields in _layer_plan():
        if kind == "con":
            f = fields[0]
            shapes[f["key"] + ".weight"] = (f["n"], f["cin"], f["size"], f["size"])
            shapes[f["key"] + ".bias"] = (f["n"],)
            last = f["n"]
        elif kind == "affine":
            shapes[fields[0] + ".gamma"] = shapes[fields[0] + ".beta"] = (last,)
        elif kind == "fc":
            shapes["fc.weight"] = (fields[0]["n"], fields[0]["cin"])
    return shapes


def _read_con(r: _Reader, f: dict, out: dict) -> None:
    version = r.name("con_4", "con_5", "con_6")
    params = r.tensor().reshape(-1)
    geometry = tuple(r.int() for _ in range(7))  # num_filters, nr, nc, stride_y, stride_x, padding_y, padding_x
    want = (f["n"], f["size"], f["size"], f["stride"], f["stride"], f["pad"], f["pad"])
    if geometry != want:
        raise _Corrupt(f"{f['key']}: convolution (filters, nr, nc, strides, paddings) {geometry}, expected {want}")
    filters, biases = r.alias(), r.alias()
    for _ in range(4):  # learning-rate and weight-decay multipliers
        r.float()
    use_bias = r.bool() if version != "con_4" else True
    if version == "con_6" and r.bool():
        raise _Corrupt(f"{f['key']}: a convolution with a fused relu, which this network does not have")
    n_w = math.prod(filters)
    if filters != (f["n"], f["cin"], f["size"], f["size"]) or not use_bias or biases != (1, f["n"], 1, 1) \
            or params.size != n_w + f["n"]:
        raise _Corrupt(f"{f['key']}: filter {filters} / bias {biases} / params {params.size} sizes unexpected")
    out[f["key"] + ".weight"] = params[:n_w].reshape(filters)
    out[f["key"] + ".bias"] = params[n_w:]


def _read_affine(r: _Reader, key: str, channels: int, out: dict) -> None:
    version = r.name("affine_", "affine_2")
    params = r.tensor().reshape(-1)
    gamma, beta = r.alias(), r.alias()
    r.expect(f"{key}: the affine mode (0 = per channel)", (0,))
    if version == "affine_2" and r.bool():
        raise _Corrupt(f"{key}: a disabled affine layer")
    if gamma != (1, channels, 1, 1) or beta != gamma or params.size != 2 * channels:
        raise _Corrupt(f"{key}: gamma {gamma} / beta {beta} / params {params.size} sizes unexpected")
    out[key + ".gamma"], out[key + ".beta"] = params[:channels], params[channels:]


def _read_details(r: _Reader, layer: tuple, channels: int, out: dict) -> int:
    """One layer's details; returns its output channel count."""
    kind = layer[0]
    if kind == "con":
        _read_con(r, layer[1], out)
        return layer[1]["n"]
    if kind == "affine":
        _read_affine(r, layer[1], channels, out)
    elif kind == "relu":
        if r.name("relu_", "relu_2") == "relu_2" and r.bool():
            raise _Corrupt("a disabled relu layer")
    elif kind in ("max_pool", "avg_pool"):
        r.name(f"{kind}_2")
        geometry = tuple(r.int() for _ in range(6))
        if geometry != layer[1]:
            raise _Corrupt(f"{kind} (nr, nc, strides, paddings) {geometry}, expected {layer[1]}")
    elif kind == "add_prev":
        r.name("add_prev_")
    elif kind == "fc":
        f = layer[1]
        version = r.name("fc_2", "fc_3")
        n_out, n_in = r.int(), r.int()
        params = r.tensor().reshape(-1)
        weights = r.alias()
        r.alias()  # the (absent) biases
        r.expect("fc's bias mode (1 = no bias)", (1,))
        for _ in range(4):
            r.float()
        if version == "fc_3":
            r.bool()
        if (n_out, n_in) != (f["n"], f["cin"]) or weights != (n_in, n_out, 1, 1) or params.size != n_in * n_out:
            raise _Corrupt(f"fc: {n_in} -> {n_out}, weights {weights}, params {params.size}; "
                           f"expected {f['cin']} -> {f['n']} without bias")
        out["fc.weight"] = params.reshape(n_in, n_out).T  # dlib computes x @ W, torch x @ W.T
        return n_out
    return channels


def _read_wrapper_tail(r: _Reader, version: int, input_layer: bool) -> None:
    """What dlib's add_layer writes after a layer's details: three bools and its scratch tensors."""
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, get_output_..._disabled
        r.bool()
    r.tensor()  # x_grad
    r.tensor()  # cached_output
    if input_layer:
        r.tensor()  # grad_final
        if version >= 3:
            r.int()  # sample_expansion_factor
    elif version >= 2:
        r.tensor()  # params_grad


def _parse(data: bytes) -> dict[str, np.ndarray]:
    r = _Reader(data)
    r.expect("the loss layer's version", (1,))
    if r.name("loss_metric_", "loss_metric_2") == "loss_metric_2":
        r.float()  # margin and distance threshold: training only
        r.float()
    plan = _layer_plan()
    # wrapper versions, from the output down to the layer just above the input
    versions = []
    for layer in reversed(plan[1:]):
        allowed = (1,) if layer[0] in ("tag", "skip") else (1, 2)
        versions.append(r.expect(f"the version of a {layer[0]} layer wrapper", allowed))
    versions.reverse()
    input_version = r.expect("the input layer wrapper's version", (2, 3))
    r.name("input_rgb_image_sized")
    mean = np.array([r.float() for _ in range(3)], dtype=np.float32)
    size = (r.int(), r.int())
    if size != (CHIP_SIZE, CHIP_SIZE):
        raise _Corrupt(f"input size {size}, expected {(CHIP_SIZE, CHIP_SIZE)}")
    out = {"input.mean": mean}
    channels = _read_details(r, plan[0], 3, out)
    _read_wrapper_tail(r, input_version, input_layer=True)
    for layer, version in zip(plan[1:], versions):
        if layer[0] in ("tag", "skip"):
            continue  # these wrappers write only their version
        channels = _read_details(r, layer, channels, out)
        _read_wrapper_tail(r, version, input_layer=False)
    if r.pos != len(data):
        raise _Corrupt(f"{len(data) - r.pos} bytes follow the network")
    for key, value in out.items():  # dlib's format has no checksum; damaged floats may show as inf/nan
        if not np.isfinite(value).all():
            raise _Corrupt(f"{key} holds non-finite values")
    return out


def read_dat(path: str | Path) -> dict[str, torch.Tensor]:
    """Parse dlib's face-recognition ResNet file into float32 tensors, named as in :func:`expected_shapes`.

    Raw dlib parameters, not folded: ``*.conv*.weight`` ``[out, in, 3, 3]`` (cross-correlation, as
    torch), ``*.bias``, ``*.affine*.gamma`` / ``.beta`` (per channel), ``fc.weight`` ``[128, 256]``
    (torch's layout) and ``input.mean`` (dlib's mean R, G, B pixel values).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TsdfBenchError(f"dlib ResNet: cannot read {path}: {exc}; {REINSTALL_HINT}") from exc
    try:
        arrays = _parse(data)
    except _Corrupt as exc:
        raise TsdfBenchError(f"dlib ResNet: {path} is not the dlib face-recognition ResNet model it should be "
                             f"({exc}); the file is truncated or corrupt: {REINSTALL_HINT}") from None
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in arrays.items()}


def default_dat_path() -> Path:
    """``dlib_face_recognition_resnet_model_v1.dat`` of the installed ``face-recognition-models``."""
    from tsdf_bench_plugins.metrics.identity import RECOGNITION_FILE, model_file

    return model_file(RECOGNITION_FILE)


def _valid(tensors) -> bool:
    shapes = expected_shapes()
    return isinstance(tensors, dict) and set(tensors) == set(shapes) and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == shapes[k]
        for k, t in tensors.items())


# -- the torch module ------------------------------------------------------------------------------
def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: ``a + b`` after zero-padding both to the larger size of every dimension."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t):
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


def _fold(conv: nn.Conv2d, weight, bias, gamma, beta) -> None:
    """conv followed by dlib's affine (``gamma * y + beta`` per channel) as one convolution."""
    with torch.no_grad():
        conv.weight.copy_(weight * gamma.view(-1, 1, 1, 1))
        conv.bias.copy_(bias * gamma + beta)


class _Block(nn.Module):
    """dlib's ``ares`` (``down=False``) or ``ares_down`` residual block."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_padded(y, shortcut))


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet: ``forward(x)`` maps RGB pixel values ``[N, 3, 150, 150]``
    (float, 0..255, as the uint8 chip) to the 128-d descriptors (float32), as dlib's
    ``compute_face_descriptor`` does with ``num_jitters`` 0 or 1 (the raw fc output; dlib does not
    normalise it).  Build it with :func:`load_model` or ``DlibResNet(read_dat(path))``.
    """

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        if not _valid(weights):
            raise TsdfBenchError("dlib ResNet: the weights do not have this network's names and shapes "
                                 "(build them with read_dat)")
        self.register_buffer("mean", weights["input.mean"].clone().view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 32, 7, stride=2)
        blocks, cin = [], 32
        for cout, down in BLOCKS:
            blocks.append(_Block(cin, cout, down))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, DESCRIPTOR_SIZE, bias=False)
        w = weights
        _fold(self.stem, w["stem.conv.weight"], w["stem.conv.bias"], w["stem.affine.gamma"], w["stem.affine.beta"])
        for i, block in enumerate(self.blocks):
            for j in (1, 2):
                p = f"blocks.{i}."
                _fold(getattr(block, f"conv{j}"), w[f"{p}conv{j}.weight"], w[f"{p}conv{j}.bias"],
                      w[f"{p}affine{j}.gamma"], w[f"{p}affine{j}.beta"])
        with torch.no_grad():
            self.fc.weight.copy_(w["fc.weight"])
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / 256.0  # dlib's input_rgb_image_sized
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))  # avg_pool_everything, fc_no_bias

    def descriptors(self, chips: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """128-d descriptors ``[N, 128]`` float64 of uint8 RGB face chips ``[N, 150, 150, 3]`` (as
        ``dlib.get_face_chip(img, shape, size=150, padding=0.25)`` makes them)."""
        chips = np.asarray(chips)
        if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
            raise TsdfBenchError(f"dlib ResNet: expected uint8 RGB chips [N, {CHIP_SIZE}, {CHIP_SIZE}, 3], got "
                                 f"{chips.dtype} {chips.shape}")
        out = np.empty((len(chips), DESCRIPTOR_SIZE), dtype=np.float64)
        device = self.mean.device
        with torch.inference_mode():
            for start in range(0, len(chips), batch_size):
                part = chips[start:start + batch_size]
                # every forward has the same shape: torch's CPU kernels pick their algorithm by
                # shape, so a chip's descriptor would otherwise depend (in the last bits) on how
                # many chips came with it, and a metric computed batch by batch would not equal
                # the same metric computed at once
                batch = np.zeros((batch_size, *part.shape[1:]), np.uint8)
                batch[:len(part)] = part
                x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()
                out[start:start + len(part)] = self(x)[:len(part)].double().cpu().numpy()
        return out


def load_model(dat_path: str | Path | None = None) -> DlibResNet:
    """The :class:`DlibResNet` of ``dat_path`` (default: the installed package's file), on the CPU.
    Parsing the 22 MB file takes ~35 ms, so nothing is cached."""
    return DlibResNet(read_dat(dat_path if dat_path is not None else default_dat_path()))


@functools.lru_cache(maxsize=1)
def _default_model() -> DlibResNet:
    return load_model()


def descriptors(chips: np.ndarray, model: DlibResNet | None = None, batch_size: int = 16) -> np.ndarray:
    """``[N, 128]`` float64 descriptors of uint8 RGB chips ``[N, 150, 150, 3]``; ``model`` defaults to
    one built once per process from the installed package's file."""
    return (model if model is not None else _default_model()).descriptors(chips, batch_size)
