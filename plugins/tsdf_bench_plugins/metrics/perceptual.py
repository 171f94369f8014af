"""LPIPS (Zhang et al., CVPR 2018) between forgeries, with the ``lpips`` package, never downloading.

Columns: ``lpips``: mean LPIPS between ``G(x)`` and ``G(x + W)`` over (image, target) pairs (the
Proactive Defense Benchmark's ``alex_lpips`` of the decoded outputs, higher = stronger disruption);
``lpips_in``: mean LPIPS between ``x`` and ``x + W`` (invisibility, lower = less visible).

LPIPS needs two sets of weights.  Its linear calibration layers ship inside the ``lpips`` wheel
(``lpips/weights/v0.1/<net>.pth``).  Its backbone is torchvision's ImageNet classifier, which
``lpips.LPIPS()`` would download on first use into torch hub's cache
(``torch.hub.get_dir()/checkpoints/``, i.e. ``$TORCH_HOME/hub/checkpoints``).  This plugin never lets
it: it builds the network with a random backbone (``pnet_rand=True``, nothing fetched) and loads the
backbone from a local file, looked up in order at ``backbone=`` (config option), the
``TSDF_BENCH_LPIPS_BACKBONE`` environment variable, then torch hub's cache under torchvision's own
file name (:data:`BACKBONE_FILES`).  Without one it fails with an error that names the file and
where to put it: copy it from a machine that has it (any machine that ran torchvision's
``alexnet(weights="IMAGENET1K_V1")`` has it in its hub cache).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from tsdf_bench.errors import ConfigError, TsdfBenchError
from tsdf_bench.metrics import EvalBatch, Metric, _pairs

ENV = "TSDF_BENCH_LPIPS_BACKBONE"
#: torchvision's file name of each LPIPS backbone (the basename of its weights URL).
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                  "squeeze": "squeezenet1_1-b8a52dc0.pth"}
_TV_BUILDERS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


class LpipsWeightsMissing(TsdfBenchError):
    """The LPIPS backbone file is not on this machine (and will not be downloaded)."""


def backbone_candidates(net: str, backbone: str | os.PathLike | None = None) -> list[Path]:
    """Where the backbone of ``net`` is looked for, in order."""
    if backbone:
        return [Path(backbone).expanduser()]
    out = []
    if os.environ.get(ENV):
        out.append(Path(os.environ[ENV]).expanduser())
    out.append(Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net])
    return out


def find_backbone(net: str, backbone: str | os.PathLike | None = None) -> Path:
    """The local backbone file of ``net``, or :class:`LpipsWeightsMissing` naming it and the fix."""
    candidates = backbone_candidates(net, backbone)
    for path in candidates:
        if path.is_file():
            return path
    file = BACKBONE_FILES[net]
    where = ", ".join(str(p) for p in candidates)
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    raise LpipsWeightsMissing(
        f"metric 'lpips': the {net!r} backbone weights {file} are not on this machine (looked at: {where}); "
        f"tsdf-bench never downloads them. Fix: copy {file} (torchvision's ImageNet weights) into {hub}/, "
        f"or set {ENV}=/path/to/{file}, or give the metric's option backbone = \"/path/to/{file}\"; "
        "or leave the 'lpips' metric out of the run.")


def build_lpips(net: str = "alex", backbone: str | os.PathLike | None = None, device="cpu"):
    """An ``lpips.LPIPS`` with the shipped linear layers and the local backbone; downloads nothing."""
    path = find_backbone(net, backbone)
    try:
        import lpips
        import torchvision
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TsdfBenchError("metric 'lpips': the lpips package is not installed (pip install lpips; "
                             "python3 bootstrap.py installs it)") from exc
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    reference = getattr(torchvision.models, _TV_BUILDERS[net])(weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        reference.load_state_dict(state)
    except Exception as exc:
        raise TsdfBenchError(f"metric 'lpips': {path} is not torchvision's {_TV_BUILDERS[net]} weights "
                             f"({type(exc).__name__}: {exc})") from exc
    features = reference.features
    for slice_ in model.net.children():  # slice1..N hold features[i] under the name str(i)
        for name, layer in slice_.named_children():
            layer.load_state_dict(features[int(name)].state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


class LpipsMetric(Metric):
    """LPIPS of the forgeries (and of the inputs) on local weights only, computed batch by batch.

    Args: ``net`` ("alex", PDB's choice; "vgg", "squeeze"), ``backbone`` (path of the backbone
    file; default: ``$TSDF_BENCH_LPIPS_BACKBONE``, then torch hub's cache), ``batch_size`` (64).
    The weights are looked up when the metric is created, so a missing file stops a run before it
    starts.
    """

    default = False  # not run unless a config names it ([metrics] names)

    name = "lpips"
    columns = ("lpips", "lpips_in")

    def __init__(self, net: str = "alex", backbone: str | None = None, batch_size: int = 64):
        if net not in BACKBONE_FILES:
            raise ConfigError(f"metric 'lpips': net must be one of {', '.join(BACKBONE_FILES)}, got {net!r}")
        self.net, self.backbone, self.batch_size = net, backbone, int(batch_size)
        find_backbone(net, backbone)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = build_lpips(self.net, self.backbone)
        return self._model

    @torch.no_grad()
    def distances(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS per pair of images ``[N, 3, H, W]`` in [-1, 1]: ``[N]``."""
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
            raise TsdfBenchError(f"metric 'lpips': expected two [N, 3, H, W] batches of one shape, got "
                                 f"{tuple(a.shape)} and {tuple(b.shape)}")
        model = self.model
        dev = next(model.parameters()).device
        out = []
        for i in range(0, a.shape[0], self.batch_size):
            x = a[i:i + self.batch_size].to(dev).float().clamp(-1, 1)
            y = b[i:i + self.batch_size].to(dev).float().clamp(-1, 1)
            out.append(model(x, y).flatten().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def start(self) -> dict:
        return {"lpips_in": _Chunked(self), "lpips": _Chunked(self)}

    def update(self, state: dict, batch: EvalBatch) -> None:
        if batch.protected is not None and batch.clean is not None and batch.clean.shape[0]:
            state["lpips_in"].add(batch.clean, batch.protected)
        if batch.fake_clean is not None and batch.fake_protected is not None:
            fc, fp = _pairs(batch.fake_clean, "fake_clean"), _pairs(batch.fake_protected, "fake_protected")
            if fc.numel():
                state["lpips"].add(fc.reshape(-1, *fc.shape[2:]), fp.reshape(-1, *fp.shape[2:]))

    def finish(self, state: dict) -> dict[str, float | None]:
        res: dict[str, float | None] = dict.fromkeys(self.columns)
        for column, chunks in state.items():
            d = chunks.result()
            if d is not None:
                res[column] = float(d.mean())
        return res


class _Chunked:
    """Pairs of images added in batches of any size, scored ``metric.batch_size`` pairs at a time
    counted from the first pair: the chunks one :meth:`LpipsMetric.distances` call on every pair
    makes, so the distances do not depend on the batching.  Holds fewer than a chunk's pairs."""

    def __init__(self, metric: LpipsMetric):
        self.metric, self.a, self.b, self.pending, self.out = metric, [], [], 0, []

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a.append(a)
        self.b.append(b)
        self.pending += a.shape[0]
        size = self.metric.batch_size
        if self.pending >= size:
            a, b = torch.cat(self.a), torch.cat(self.b)
            full = self.pending - self.pending % size
            self.out.append(self.metric.distances(a[:full], b[:full]))
            self.a, self.b, self.pending = [a[full:]], [b[full:]], self.pending - full

    def result(self) -> torch.Tensor | None:
        """Every pair's distance, in order (None when no pair was added)."""
        if self.pending:
            self.out.append(self.metric.distances(torch.cat(self.a), torch.cat(self.b)))
            self.a, self.b, self.pending = [], [], 0
        return torch.cat(self.out) if self.out else None
