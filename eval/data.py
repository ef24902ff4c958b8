"""Image-folder dataset for benchmark images (FFHQ, ImageNet-val and similar layouts).

File order
----------
Image files (extensions in :data:`hessdiff.eval.images.IMAGE_EXTENSIONS`, any case) are found
under ``root`` (recursively by default) and sorted by their path relative to ``root`` in POSIX
form (``order="path"``), or by file name first (``order="name"``, useful for ImageNet-val
stored in class folders, so that ``ILSVRC2012_val_00000001.JPEG`` comes first whatever its
class). FFHQ (``00000.png`` ... or ``00000/00000.png`` ...) and ImageNet-val
(``ILSVRC2012_val_00000001.JPEG`` ...) names are zero-padded, so this is their numeric order.
Alternatively an explicit list of files (relative to ``root`` or absolute) is used in the
order given.

Unreadable files
----------------
Every candidate file is opened and checked (``check="verify"``: PIL's header and
``Image.verify()``, which catches non-image data and truncated PNG files without decoding;
``check="decode"``: a full decode; ``"verify"`` decodes non-PNG files fully too, since
``verify()`` does not check their data, e.g. a truncated JPEG). Files that fail are skipped with one warning, listed in
:attr:`ImageFolderDataset.skipped` and counted in :attr:`ImageFolderDataset.num_skipped`.
``first_n`` counts readable images: the first ``first_n`` readable files in order are used.

Items and seeds
---------------
Item ``i`` is :class:`ImageItem` ``(image, index=i, seed=base_seed + i, filename)`` where
``image`` is float32 ``[3, H, W]`` in ``[-1, 1]`` (``from_uint8`` of the resized uint8
image) and ``filename`` is the path relative to ``root`` (POSIX). Indices number the readable
images in order, so the per-image seed of a file does not depend on batch size or on how
the dataset is split between processes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from hessdiff.eval.images import IMAGE_EXTENSIONS, RESIZE_MODES, resize_image
from hessdiff.utils.images import from_uint8, load_image, to_uint8

__all__ = ["ImageFolderDataset", "ImageItem", "list_image_files"]

CHECK_MODES = ("verify", "decode")


class ImageItem(NamedTuple):
    """One dataset item: image float32 ``[3, H, W]`` in ``[-1, 1]``, its index, seed and file name."""

    image: torch.Tensor
    index: int
    seed: int
    filename: str


def list_image_files(root: str | os.PathLike, *, recursive: bool = True, order: str = "path") -> list[Path]:
    """Return the image files under ``root`` in the documented order (see the module docstring).

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: unknown ``order``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    if order not in ("path", "name"):
        raise ValueError(f"order must be 'path' or 'name', got {order!r}")
    it = root.rglob("*") if recursive else root.iterdir()
    files = [p for p in it if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if order == "path":
        files.sort(key=lambda p: p.relative_to(root).as_posix())
    else:
        files.sort(key=lambda p: (p.name, p.relative_to(root).as_posix()))
    return files


def _check_readable(path: Path, check: str) -> str | None:
    """Return ``None`` when ``path`` reads as an image, else the reason it does not."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            fmt = img.format
            if check == "verify":
                img.verify()
            else:
                img.convert("RGB").load()
        if check == "verify" and fmt != "PNG":
            # verify() checks PNG chunks but not the data of other formats (a truncated JPEG passes it and
            # fails mid-run, at the same file on every resume): decode those fully
            with Image.open(path) as img:
                img.load()
    except Exception as err:  # PIL raises many types for bad data
        return f"{type(err).__name__}: {err}"
    return None


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a folder, resized to a model's resolution, with per-image seeds.

    Args:
        root: the folder.
        resolution: target size, an int (square) or ``(height, width)``; ``None`` keeps each
            image's own size.
        first_n: use only the first ``first_n`` readable images (in file order).
        files: explicit list of files (relative to ``root`` or absolute), used in this order
            instead of scanning ``root``; a listed file that does not exist is an error.
        resize: resize mode, one of :data:`hessdiff.eval.images.RESIZE_MODES`; the default
            ``"center-crop"`` crops the centred box of the target aspect ratio and resizes it
            with PIL bicubic (antialiased).
        recursive: search sub-folders (FFHQ's ``00000/00000.png`` layout, ImageNet class folders).
        order: ``"path"`` or ``"name"`` (see the module docstring).
        base_seed: item ``i`` gets seed ``base_seed + i``.
        check: ``"verify"`` (fast) or ``"decode"`` (full decode) when screening files.

    Raises:
        FileNotFoundError: ``root`` or a listed file does not exist.
        ValueError: no readable image, fewer readable images than ``first_n``, bad arguments.

    Attributes:
        files: the readable files used, in order (absolute paths).
        skipped: ``(path, reason)`` for each unreadable file that was skipped.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int | tuple[int, int] | None = None,
        *,
        first_n: int | None = None,
        files: Sequence[str | os.PathLike] | None = None,
        resize: str = "center-crop",
        recursive: bool = True,
        order: str = "path",
        base_seed: int = 0,
        check: str = "verify",
    ) -> None:
        self.root = Path(root)
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; choose one of {sorted(RESIZE_MODES)}")
        if check not in CHECK_MODES:
            raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
        if first_n is not None and first_n <= 0:
            raise ValueError(f"first_n must be a positive integer, got {first_n}")
        if resolution is not None and isinstance(resolution, int) and resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.resize = resize
        self.base_seed = int(base_seed)
        self.check = check

        # absolute paths: files= lists from a relative root (e.g. another dataset's .files) are not
        # joined to the root a second time, and the results do not depend on the working directory
        root_abs = self.root.absolute()
        self._root_abs = root_abs
        if files is None:
            candidates = list_image_files(root_abs, recursive=recursive, order=order)
            if not candidates:
                raise ValueError(
                    f"no image files found in {self.root} (looked for extensions "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}{', recursively' if recursive else ''})"
                )
        else:
            if not self.root.is_dir():
                raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
            candidates = [p if p.is_absolute() else root_abs / p for p in map(Path, files)]
            missing = [str(p) for p in candidates if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"listed image files do not exist: {', '.join(missing[:5])}"
                                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
            if not candidates:
                raise ValueError("files= is an empty list")

        self.files: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        for path in candidates:
            if first_n is not None and len(self.files) == first_n:
                break
            reason = _check_readable(path, check)
            if reason is None:
                self.files.append(path)
            else:
                self.skipped.append((path, reason))
        if self.skipped:
            first = self.skipped[0]
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image file(s) in {self.root}; "
                f"first: {first[0]} ({first[1]})",
                stacklevel=2,
            )
        if not self.files:
            raise ValueError(f"no readable image in {self.root}: all {len(self.skipped)} image file(s) failed to open")
        if first_n is not None and len(self.files) < first_n:
            raise ValueError(
                f"first_n={first_n} requested but {self.root} has only {len(self.files)} readable "
                f"image(s) ({len(self.skipped)} skipped)"
            )

    @property
    def num_skipped(self) -> int:
        """Number of unreadable files skipped."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.files)

    def relative_name(self, i: int) -> str:
        """File name of item ``i`` relative to ``root`` (POSIX), or its absolute path if outside."""
        path = self.files[i]
        try:
            return path.relative_to(self._root_abs).as_posix()
        except ValueError:
            return path.as_posix()

    def load_uint8(self, i: int) -> torch.Tensor:
        """Item ``i``'s image as uint8 ``[3, H, W]`` after resizing.

        The file is read with :func:`hessdiff.utils.images.load_image` (as RGB, EXIF orientation
        applied; 16-bit images scaled by 65535) and quantised with ``to_uint8``, which gives an
        8-bit file's pixels exactly; resizing works on that uint8 image.

        Raises:
            OSError: the file could not be decoded (its name is in the message); screening with
                ``check="decode"`` rules this out.
        """
        from PIL import Image

        if not 0 <= i < len(self.files):
            raise IndexError(f"index {i} out of range for a dataset of {len(self.files)} images")
        path = self.files[i]
        try:
            u = to_uint8(load_image(path, channels=3))[0]
        except (OSError, ValueError) as err:
            raise OSError(f"could not decode image {path}: {err} (use check='decode' to skip such files)") from err
        if self.resolution is None:
            return u
        img = resize_image(Image.fromarray(u.permute(1, 2, 0).numpy()), self.resolution, self.resize)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> ImageItem:
        return ImageItem(from_uint8(self.load_uint8(i)), i, self.base_seed + i, self.relative_name(i))

    def describe(self) -> dict:
        """Settings that determine the images (for result records and cache keys)."""
        return {
            "root": str(self.root),
            "num_images": len(self.files),
            "num_skipped": self.num_skipped,
            "resolution": self.resolution,
            "resize": self.resize if self.resolution is not None else "none",
            "base_seed": self.base_seed,
        }
