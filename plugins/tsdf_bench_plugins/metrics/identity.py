"""Identity disruption: does the forgery of a protected face still look like the person?

The Proactive Defense Benchmark's CIDR (Baek et al., ICML 2026; ``evaluation/evaluate_id.py`` and
``evaluate_id_robust.py`` in its code) per (image, target) pair::

    id_clean = ID(x, G(x))          id_prot = ID(x, G(x + W))
    CIDR     = max(0, 1 - id_clean / id_prot)      (0 when id_prot is 0)

with ``ID(a, b) = 1 - cos(f(a), f(b))`` on a face-recognition embedding ``f``; the cell's value is
the mean over pairs.  CIDR is 0 when protection does not move the forgery's identity further from
the person than the edit itself does, and tends to 1 when it does by far.  PDB uses an ArcFace
IR-SE50 whose weights must be downloaded; this metric uses the **dlib ResNet face-recognition
model** (Davis King; 128-d embedding, 99.38 % on LFW) that ships inside the
``face-recognition-models`` package (CC0 licence file; its metadata's classifier says MIT), run
with ``dlib-bin`` (Boost licence): both install from PyPI and nothing is downloaded at run time.
Numbers are therefore CIDR-*style*: same formula, different recogniser.

Alignment: dlib's 5-point landmark model (``shape_predictor_5_face_landmarks.dat``, CC0, in the
same package; the 68-point model is not used, its training data is not licensed for commercial use)
locates the eyes and nose of the **clean** image inside the face box that an aligned, CelebA-framed
crop has (:data:`tsdf_bench.data.embedded.FACE_FRACTION` of the side, centred
:data:`~tsdf_bench.data.embedded.CENTRE_SHIFT` below the middle), and the same 150x150 face chip
transform is applied to ``x``, ``G(x)`` and ``G(x + W)``: a disrupted forgery cannot escape by
breaking the landmark fit, as PDB's fixed crop of aligned faces does not let it either.
``align="box"`` skips the landmarks and crops that box (PDB's fixed-crop style).

The ResNet runs in PyTorch by default (``backend="torch"``: :mod:`.dlib_resnet`, the same network
and weights read from the same file; descriptors within 1e-5 of dlib's, ~10x faster on one core,
because ``dlib-bin`` is built without BLAS); ``backend="dlib"`` runs dlib's own
``compute_face_descriptor``.  Landmarks and chips are dlib's either way.

Columns: ``cidr``; ``id_sim_clean`` / ``id_sim_protected``: mean cosine similarity of ``x`` with
``G(x)`` / ``G(x + W)``; ``id_loss_out``: mean ``ID(G(x), G(x + W))`` (PDB's white-box
``id_loss``).  All ``None`` when the batch carries no forgeries.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch

from tsdf_bench.errors import ConfigError, TsdfBenchError
from tsdf_bench.metric_streaming import PairValues
from tsdf_bench.metrics import EvalBatch, Metric, _pairs

PACKAGE = "face_recognition_models"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARK_FILE = "shape_predictor_5_face_landmarks.dat"
INSTALL_HINT = "pip install dlib-bin face-recognition-models (python3 bootstrap.py installs both)"
CHIP_SIZE = 150  # the size dlib's ResNet takes
CHIP_PADDING = 0.25  # dlib's default face-chip padding
CACHE_BYTES = 64 << 20  # embeddings of recent batches remembered per metric instance (~250k faces)


def model_file(name: str) -> Path:
    """A model file of the installed ``face-recognition-models`` package, located without importing
    it (its ``__init__`` imports ``pkg_resources``, gone from recent setuptools)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TsdfBenchError(f"identity metric: the {PACKAGE!r} package is not installed ({INSTALL_HINT})")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise TsdfBenchError(f"identity metric: {path} is missing; reinstall it ({INSTALL_HINT})")
    return path


def _dlib():
    try:
        import dlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TsdfBenchError(f"identity metric: dlib is not installed ({INSTALL_HINT})") from exc
    return dlib


class DlibFaceEmbedder:
    """128-d dlib ResNet embeddings of aligned face images ``[N, 3, H, W]`` in [-1, 1].

    ``embed(images, like=None)``: ``like`` (same shape) gives the images whose landmarks align
    ``images`` (default: ``images`` themselves).  Returns float64 ``[N, 128]``.
    """

    def __init__(self, align: str = "landmarks", face_fraction: float | None = None, centre_shift: float | None = None,
                 backend: str = "torch"):
        from tsdf_bench.data.embedded import CENTRE_SHIFT, FACE_FRACTION

        _check(align, backend)
        dlib = _dlib()
        self.align, self.backend = align, backend
        self.face_fraction = FACE_FRACTION if face_fraction is None else float(face_fraction)
        self.centre_shift = CENTRE_SHIFT if centre_shift is None else float(centre_shift)
        self._dlib = dlib
        if backend == "torch":
            from .dlib_resnet import load_model

            self.recogniser = load_model(model_file(RECOGNITION_FILE))
        else:
            self.recogniser = dlib.face_recognition_model_v1(str(model_file(RECOGNITION_FILE)))
        self.landmarks = dlib.shape_predictor(str(model_file(LANDMARK_FILE)))

    @staticmethod
    def to_uint8(images: torch.Tensor) -> np.ndarray:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise TsdfBenchError(f"identity metric: expected images [N, 3, H, W] in [-1, 1], got {shape}")
        u8 = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return np.ascontiguousarray(u8.permute(0, 2, 3, 1).numpy())

    def face_box(self, h: int, w: int):
        side = self.face_fraction * min(h, w)
        cx, cy = w / 2, h / 2 + self.centre_shift * h
        return self._dlib.rectangle(int(round(cx - side / 2)), int(round(cy - side / 2)),
                                    int(round(cx + side / 2)), int(round(cy + side / 2)))

    def shapes(self, images: torch.Tensor) -> list:
        """One dlib ``full_object_detection`` per image (5 landmarks, or the box's corners)."""
        arr = self.to_uint8(images)
        box = self.face_box(*arr.shape[1:3])
        if self.align == "landmarks":
            return [self.landmarks(img, box) for img in arr]
        # 'box': a shape whose chip is the box itself (dlib maps the 5 points of a frontal face)
        return [self._box_shape(box) for _ in arr]

    def _box_shape(self, box):
        dlib = self._dlib
        l, t, r, b = box.left(), box.top(), box.right(), box.bottom()
        w, h = r - l, b - t
        # dlib's 5-point order (eye corners, eye corners, nose) at the mean layout the landmark
        # model finds on the embedded faces inside this box, made left-right symmetric
        rel = [(0.73, 0.36), (0.60, 0.365), (0.27, 0.36), (0.40, 0.365), (0.50, 0.63)]
        pts = [dlib.point(int(round(l + x * w)), int(round(t + y * h))) for x, y in rel]
        return dlib.full_object_detection(box, pts)

    def embed(self, images: torch.Tensor, shapes: list | None = None) -> np.ndarray:
        arr = self.to_uint8(images)
        if shapes is None:
            shapes = self.shapes(images)
        if len(shapes) != len(arr):
            raise TsdfBenchError(f"identity metric: {len(shapes)} alignments for {len(arr)} images")
        if len(arr) == 0:
            return np.zeros((0, 128))
        chips = [self._dlib.get_face_chip(img, s, size=CHIP_SIZE, padding=CHIP_PADDING) for img, s in zip(arr, shapes)]
        if self.backend == "torch":
            return self.recogniser.descriptors(np.stack(chips))
        return np.asarray(self.recogniser.compute_face_descriptor(chips), dtype=np.float64)


def _check(align: str, backend: str) -> None:
    if align not in ("landmarks", "box"):
        raise ConfigError(f"metric 'identity': align must be 'landmarks' or 'box', got {align!r}")
    if backend not in ("torch", "dlib"):
        raise ConfigError(f"metric 'identity': backend must be 'torch' (dlib's network in PyTorch, the default) "
                          f"or 'dlib' (dlib's own), got {backend!r}")


def _digest(images: torch.Tensor) -> str:
    """A key for a batch as the recogniser sees it (uint8 pixels and shape)."""
    u8 = DlibFaceEmbedder.to_uint8(images)
    return hashlib.sha1(u8.tobytes() + repr(u8.shape).encode()).hexdigest()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``[N, D]`` arrays."""
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def cidr_values(id_clean: np.ndarray, id_prot: np.ndarray) -> np.ndarray:
    """PDB's relative identity disruption per pair: ``max(0, 1 - id_clean / id_prot)``, 0 where ``id_prot`` is 0."""
    id_clean, id_prot = np.asarray(id_clean, float), np.asarray(id_prot, float)
    out = np.zeros_like(id_prot)
    nz = id_prot != 0
    out[nz] = np.maximum(0.0, 1.0 - id_clean[nz] / id_prot[nz])
    return out


class IdentityMetric(Metric):
    """CIDR-style identity disruption on dlib's face-recognition ResNet (see the module docstring).

    Args: ``align`` ("landmarks" or "box"), ``face_fraction`` / ``centre_shift`` (the face box of
    an aligned crop; default the embedded data's framing), ``backend`` ("torch", default, or
    "dlib": which runs the ResNet).  The model loads on first use.
    """

    default = False  # not run unless a config names it ([metrics] names)

    name = "identity"
    columns = ("cidr", "id_sim_clean", "id_sim_protected", "id_loss_out")

    def __init__(self, align: str = "landmarks", face_fraction: float | None = None,
                 centre_shift: float | None = None, backend: str = "torch"):
        _check(align, backend)
        self.align, self.face_fraction, self.centre_shift, self.backend = align, face_fraction, centre_shift, backend
        self._embedder: DlibFaceEmbedder | None = None
        self._cache: dict = {}

    @property
    def embedder(self) -> DlibFaceEmbedder:
        if self._embedder is None:
            self._embedder = DlibFaceEmbedder(self.align, self.face_fraction, self.centre_shift, self.backend)
        return self._embedder

    def pair_values(self, clean: torch.Tensor, fake_clean: torch.Tensor, fake_protected: torch.Tensor) -> dict:
        """Per (image, target) pair, in row-major order: ``cidr``, ``id_sim_clean``,
        ``id_sim_protected``, ``id_loss_out`` (arrays; a pair's values are its own)."""
        fc, fp = _pairs(fake_clean, "fake_clean"), _pairs(fake_protected, "fake_protected")
        if fc.shape != fp.shape or fc.shape[0] != clean.shape[0] or fc.shape[2:] != clean.shape[1:]:
            raise TsdfBenchError(f"identity metric: shapes differ: clean {tuple(clean.shape)}, fake_clean "
                                 f"{tuple(fc.shape)}, fake_protected {tuple(fp.shape)}")
        n, t = fc.shape[:2]
        emb = self.embedder
        shapes = emb.shapes(clean)
        align_key = _digest(clean)
        e_x = self._embed(clean, shapes, align_key)
        rep = [s for s in shapes for _ in range(t)]  # pair (i, j) -> image i's alignment
        e_fc = self._embed(fc.reshape(n * t, *fc.shape[2:]), rep, align_key)
        e_fp = self._embed(fp.reshape(n * t, *fp.shape[2:]), rep, align_key)
        e_xr = np.repeat(e_x, t, axis=0)
        sim_clean, sim_prot = cosine(e_xr, e_fc), cosine(e_xr, e_fp)
        return {"cidr": cidr_values(1.0 - sim_clean, 1.0 - sim_prot), "id_sim_clean": sim_clean,
                "id_sim_protected": sim_prot, "id_loss_out": 1.0 - cosine(e_fc, e_fp)}

    def scores(self, clean: torch.Tensor, fake_clean: torch.Tensor, fake_protected: torch.Tensor) -> dict:
        """The columns of one whole batch (the means of :meth:`pair_values`)."""
        return {k: float(v.mean()) for k, v in self.pair_values(clean, fake_clean, fake_protected).items()}

    def _embed(self, images: torch.Tensor, shapes: list, align_key: str) -> np.ndarray:
        """Embeddings, remembered for recent batches (within :data:`CACHE_BYTES`): the clean images
        and their forgeries recur in every cell of a (model, adaptation), only the protected
        forgeries change."""
        key = (_digest(images), align_key)
        if key not in self._cache:
            value = self.embedder.embed(images, shapes)
            while self._cache and sum(v.nbytes for v in self._cache.values()) + value.nbytes > CACHE_BYTES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = value
        return self._cache[key]

    def start(self) -> PairValues:
        return PairValues()

    def update(self, state: PairValues, batch: EvalBatch) -> None:
        if batch.fake_clean is None or batch.fake_protected is None or batch.clean.shape[0] == 0:
            return
        state.add(self.pair_values(batch.clean, batch.fake_clean, batch.fake_protected))

    def finish(self, state: PairValues) -> dict[str, float | None]:
        if not len(state):
            return dict.fromkeys(self.columns)
        return {k: float(v.mean()) for k, v in state.values().items()}
