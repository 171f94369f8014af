"""Validated image reading and lossless writing.

Every image that enters the benchmark goes through :func:`read_image`, so a bad file fails
here, with an :class:`~tsdf_bench.errors.ImageError` naming the file and the reason, rather
than deep inside a model.  Refused: empty files, files Pillow cannot identify, corrupt or
truncated data (the whole image is decoded, with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off) and
images above a pixel limit (a decompression-bomb guard, :data:`DEFAULT_MAX_PIXELS`).

Every mode Pillow reads becomes 8-bit RGB:

* ``1``/``L`` grey and ``I;16``/``I`` 16-bit grey: replicated to three channels (16-bit values
  are divided by 257, so 65535 -> 255);
* ``P`` palette images: expanded; a palette with transparency is treated like RGBA;
* ``RGBA``/``LA``/``PA``: **composited on a white background** (``background`` argument),
  because a transparent pixel has no colour of its own and white is what a viewer shows;
* ``CMYK``, ``YCbCr`` and the rest: Pillow's own conversion to RGB;
* EXIF orientation is applied, so a phone photo is upright.

Tensors are ``[3, H, W]`` float in [-1, 1] (the project's convention); :func:`write_png`
quantises to 8 bits, so ``read_image(write_png(p, read_image(q)))`` is exact.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .paths import temp_path

DEFAULT_MAX_PIXELS = 50_000_000
"""Images with more pixels are refused (50 MP: larger than any face photo, far below a bomb)."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm", ".pnm")
"""File name endings that :func:`list_images` treats as images (case-insensitive)."""

_TRUNCATION_LOCK = threading.Lock()


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """Open, check size and fully decode ``path``; every failure becomes an ImageError."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as exc:
        raise ImageError(path, f"cannot stat the file ({exc})") from None
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    with warnings.catch_warnings():
        # Our own pixel limit decides; Pillow's warning would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except UnidentifiedImageError:
            raise ImageError(path, "not an image file Pillow can identify") from None
        except Image.DecompressionBombError as exc:
            raise ImageError(path, f"image too large (decompression-bomb guard: {exc})") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(path, f"corrupt image header ({exc})") from None
        width, height = img.size
        if width <= 0 or height <= 0:
            img.close()
            raise ImageError(path, f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            img.close()
            raise ImageError(path, f"image too large: {width}x{height} = {width * height:,} pixels "
                                   f"exceeds the limit of {max_pixels:,} (pass max_pixels= to raise it)")
        with _TRUNCATION_LOCK:
            previous = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            try:
                img.load()
            except Image.DecompressionBombError as exc:
                raise ImageError(path, f"image too large (decompression-bomb guard: {exc})") from None
            except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
                text = str(exc)
                kind = "truncated" if ("truncated" in text or "end of file" in text.lower()
                                       or isinstance(exc, EOFError)) else "corrupt"
                raise ImageError(path, f"{kind} image data ({type(exc).__name__}: {text})") from None
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return img


def _to_rgb(img: Image.Image, background: tuple[int, int, int], path: Path) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the rules)."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        pass
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
            arr = arr * scale
        else:  # I;16, I;16B, I;16L, I: 16-bit (or wider) integers
            arr = np.clip(arr, 0, 65535) / 257.0
        grey = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(path, f"cannot convert mode {mode!r} to RGB ({exc})") from None


def read_image_pil(path, max_pixels: int = DEFAULT_MAX_PIXELS,
                   background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Read and validate ``path``; return an RGB :class:`PIL.Image.Image` (fully decoded)."""
    path = Path(path)
    img = _open_checked(path, int(max_pixels))
    try:
        return _to_rgb(img, tuple(background), path)
    finally:
        img.close()


def read_image_uint8(path, max_pixels: int = DEFAULT_MAX_PIXELS,
                     background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Read and validate ``path``; return ``uint8`` ``[H, W, 3]`` RGB."""
    return np.array(read_image_pil(path, max_pixels, background), dtype=np.uint8)


def read_image(path, max_pixels: int = DEFAULT_MAX_PIXELS,
               background: tuple[int, int, int] = (255, 255, 255)) -> torch.Tensor:
    """Read and validate ``path``; return ``[3, H, W]`` float32 in [-1, 1].

    Raises :class:`~tsdf_bench.errors.ImageError` (``.path``, ``.reason``) for empty, non-image,
    corrupt, truncated or too-large files.
    """
    return uint8_to_tensor(read_image_uint8(path, max_pixels, background))


def uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> float32 ``[3, H, W]`` in [-1, 1]."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` (or ``[1, 3, H, W]``) in [-1, 1] -> ``uint8 [H, W, 3]`` (rounded, clipped)."""
    t = image.detach().cpu()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected an image tensor [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
    t = ((t.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return t.permute(1, 2, 0).contiguous().numpy()


def write_png(path, image, overwrite: bool = False) -> Path:
    """Write ``image`` losslessly as PNG and return the path.

    ``image`` is a tensor ``[3, H, W]``/``[1, 3, H, W]`` in [-1, 1] (quantised to 8 bits) or a
    ``uint8`` array ``[H, W, 3]``.  An existing file is never replaced unless ``overwrite=True``.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: write_png writes PNG files; give the path a .png suffix")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    arr = image if isinstance(image, np.ndarray) else tensor_to_uint8(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] or a [3, H, W] tensor, got {arr.dtype} {arr.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    Image.fromarray(arr, "RGB").save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def contact_sheet(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> torch.Tensor:
    """Tile ``[N, 3, H, W]`` images into one ``[3, H', W']`` image (white gaps), for a quick look."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    sheet = torch.ones(c, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        sheet[:, y:y + h, x:x + w] = images[i].detach().cpu().clamp(-1, 1)
    return sheet


def list_images(folder, recursive: bool = True,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``folder`` by name ending (hidden files skipped), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (expected a folder of image files)")
    exts = tuple(e.lower() for e in extensions)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)


def iter_images(folder, recursive: bool = True, stop_on_error: bool = False,
                failures: list | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple[Path, torch.Tensor]]:
    """Yield ``(path, image)`` for each readable image under ``folder``.

    A bad file raises its ImageError when ``stop_on_error``; otherwise ``(path, reason)`` is
    appended to ``failures`` (when given) and reading goes on.
    """
    for path in list_images(folder, recursive):
        try:
            image = read_image(path, max_pixels=max_pixels)
        except ImageError as exc:
            if stop_on_error:
                raise
            if failures is not None:
                failures.append((path, exc.reason))
            continue
        yield path, image


class FolderRead(NamedTuple):
    """What :func:`read_folder` found: the good images and, for each bad file, why."""
    images: list  # [(Path, Tensor[3, H, W])]
    failures: list  # [(Path, reason)]


def read_folder(folder, recursive: bool = True, stop_on_error: bool = False,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> FolderRead:
    """Read every image under ``folder``; bad files are listed in ``.failures`` (or raise)."""
    failures: list = []
    images = list(iter_images(folder, recursive, stop_on_error, failures, max_pixels))
    return FolderRead(images, failures)
