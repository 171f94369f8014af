"""Small helpers every detector plugin needs: input checks, pixel ranges, checkpoint loading."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError


def check_images(images, name: str) -> torch.Tensor:
    """Validate a ``[B, 3, H, W]`` float batch in [-1, 1]; a single ``[3, H, W]`` image is batched."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"detector {name!r}: images must be a torch.Tensor [B, 3, H, W] in [-1, 1], "
                        f"got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"detector {name!r}: images must have shape [B, 3, H, W] (RGB), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"detector {name!r}: images must be float in [-1, 1], got dtype {images.dtype}; "
                         "convert uint8 with x / 127.5 - 1")
    return images


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 255] (still float, differentiable)."""
    return (images + 1.0) * 127.5


def resolve_checkpoint(checkpoint, env_var: str, detector: str, where: str) -> Path:
    """The local checkpoint path from the ``checkpoint`` option or ``env_var``, or a clear error."""
    path = checkpoint or os.environ.get(env_var)
    if not path:
        raise CheckpointError(
            f"detector {detector!r} needs a local checkpoint: pass the option checkpoint=PATH "
            f"or set the environment variable {env_var}. "
            f"No weights ship in any installable package; {where}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"detector {detector!r}: checkpoint {path} does not exist or is not a file "
                              f"(from {'checkpoint=' if checkpoint else env_var})")
    return path


def load_state_dict_file(path: Path, detector: str) -> dict:
    """Load a torch checkpoint that is a state_dict, or a dict holding one under a usual key."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt file, pickle with classes, ...
        raise CheckpointError(f"detector {detector!r}: cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "weight", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"detector {detector!r}: checkpoint {path} holds a {type(obj).__name__}, not a state_dict")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_strict(module: torch.nn.Module, state: dict, path, detector: str):
    """``load_state_dict(strict=True)`` with an error that names the checkpoint and the mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"detector {detector!r}: checkpoint {path} does not match the architecture "
            f"({len(missing)} missing keys e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]}, "
            f"{len(shapes)} shape mismatches e.g. {shapes[:2]}); is it the right model's checkpoint?")
    module.load_state_dict(state, strict=True)
