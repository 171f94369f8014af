"""Differentiable face crops: box crops and the standard 5-landmark similarity alignment.

Both sample with ``grid_sample`` so that gradients reach the input image (poisoning attacks can
back-propagate through the attacker's preparation); the boxes and transforms are constants.

The alignment follows the ArcFace convention (Deng et al., "ArcFace: Additive Angular Margin Loss
for Deep Face Recognition", CVPR 2019; insightface ``face_align.norm_crop``): a least-squares
similarity transform (Umeyama) from the 5 detected landmarks (eyes, nose, mouth corners) to a
fixed template of a 112x112 face, scaled to the output size.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Landmark template of a 112x112 aligned face (eye centres, nose tip, mouth corners), x then y.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def bilinear_crops(images, boxes, size, supersample: int = 4):
    """Crops ``boxes [N, 5]`` (image index, x1, y1, x2, y2; continuous pixel coordinates, pixel
    i spans [i, i+1]) resampled to ``size x size`` with ``grid_sample`` (zeros outside the
    image), sampling ``supersample`` x ``supersample`` points per output pixel and averaging them
    to approximate area resampling.  Gradients flow to ``images``; the boxes are constants."""
    n, fine = boxes.shape[0], size * supersample
    h, w = images.shape[2:]
    t = (torch.arange(fine, dtype=images.dtype, device=images.device) + 0.5) / fine
    bx = boxes[:, 1:].detach().to(images.dtype).to(images.device)
    xs = bx[:, 0:1] + t[None] * (bx[:, 2:3] - bx[:, 0:1])  # [N, fine] pixel coordinates
    ys = bx[:, 1:2] + t[None] * (bx[:, 3:4] - bx[:, 1:2])
    grid = torch.stack([(xs / w * 2 - 1)[:, None, :].expand(n, fine, fine),
                        (ys / h * 2 - 1)[:, :, None].expand(n, fine, fine)], dim=-1)
    src = images[boxes[:, 0].long().to(images.device)]
    crops = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(crops, supersample) if supersample > 1 else crops


def arcface_template(size: int) -> np.ndarray:
    """The template for a ``size x size`` output (insightface's rule: multiples of 112 scale the
    112 template; other sizes scale a 128 frame holding it with an 8-pixel x offset)."""
    if size % 112 == 0:
        ratio, dx = size / 112.0, 0.0
    else:
        ratio, dx = size / 128.0, 8.0 * size / 128.0
    dst = ARCFACE_TEMPLATE * ratio
    dst[:, 0] += dx
    return dst


def similarity_matrix(landmarks, size: int) -> np.ndarray:
    """The 2x3 matrix mapping source pixels to the aligned ``size x size`` crop."""
    from skimage.transform import SimilarityTransform

    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    tform = SimilarityTransform.from_estimate(src, arcface_template(size)) if hasattr(
        SimilarityTransform, "from_estimate") else None
    if tform is None or not bool(tform):
        tform = SimilarityTransform()
        if not tform.estimate(src, arcface_template(size)):
            raise ValueError(f"cannot estimate a similarity transform from landmarks {src.tolist()}")
    return np.asarray(tform.params[:2], dtype=np.float64)


def warp_affine(image: torch.Tensor, matrix: np.ndarray, size: int) -> torch.Tensor:
    """``cv2.warpAffine``-equivalent (pixel centres at integers, bilinear, zero border) of one
    ``[3, H, W]`` image, differentiable in the image."""
    h, w = image.shape[1:]
    full = np.vstack([matrix, [0, 0, 1]])
    inv = torch.as_tensor(np.linalg.inv(full)[:2], dtype=image.dtype, device=image.device)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=image.dtype, device=image.device),
                            torch.arange(size, dtype=image.dtype, device=image.device), indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ inv.T  # source pixel coordinates
    grid = torch.stack([(2 * pts[..., 0] + 1) / w - 1, (2 * pts[..., 1] + 1) / h - 1], -1)
    return F.grid_sample(image[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def warped_region_box(matrix: np.ndarray, size: int) -> torch.Tensor:
    """Axis-aligned box (xyxy, source pixels) around the source region an aligned crop shows."""
    inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    corners = np.array([[-0.5, -0.5, 1], [size - 0.5, -0.5, 1], [-0.5, size - 0.5, 1], [size - 0.5, size - 0.5, 1]])
    src = corners @ inv.T + 0.5
    return torch.tensor([src[:, 0].min(), src[:, 1].min(), src[:, 0].max(), src[:, 1].max()], dtype=torch.float32)
