"""Clean image sets of a sweep, the model and metric image spaces, and the per-item seeds."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hessdiff.eval.sweep.config import TUNE_SIZE, canonical_json
from hessdiff.utils.images import from_uint8, to_uint8

_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in Path(name).name else name


def _image_id(name: str, content_hash: str | None = None, *, keep_extension: bool = False) -> str:
    """Item id of image file ``name`` (relative path): its stem with ``/`` as ``__``, when that is made
    only of ``[A-Za-z0-9_.=+-]``; otherwise the sanitised stem plus ``-`` and the first 8 hex digits of
    ``content_hash`` (the file's SHA-256), so that ``猫.png`` and ``犬.png`` stay two items."""
    raw = (name if keep_extension else _stem(name)).replace("/", "__")
    clean = _UNSAFE.sub("_", raw).strip("._") or "image"
    if clean == raw or content_hash is None:
        return clean
    return f"{clean}-{content_hash[:8]}"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unique_ids(files: list[str], hashes: list[str | None]) -> list[str]:
    """Ids of ``files`` (see :func:`_image_id`); names that clash only by extension keep it; any other
    clash is an error (two files must never become one item)."""
    ids = [_image_id(f, h) for f, h in zip(files, hashes, strict=True)]
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    ids = [i if counts[i] == 1 else _image_id(f, h, keep_extension=True) for i, f, h in zip(ids, files, hashes,
                                                                                          strict=True)]
    seen: dict[str, str] = {}
    for i, f in zip(ids, files, strict=True):
        if i in seen:
            raise ValueError(f"image files {seen[i]!r} and {f!r} would get the same item id {i!r} (same content "
                             "and names that differ only in characters outside [A-Za-z0-9_.=+-]); rename one")
        seen[i] = f
    return ids


class _ImageSet:
    """Clean images: ids, per-image seeds, a digest of the file list, and uint8 loading at a resolution."""

    def __init__(self, kind: str, *, folder: Path | None = None, embedded: str | None = None,
                 first_n: int | None = None, skip: int = 0, resize: str = "center-crop", order: str = "path",
                 recursive: bool = True, base_seed: int = 0, check: str = "verify") -> None:
        self.kind = kind
        self.folder, self.embedded = folder, embedded
        self.resize = resize
        self.base_seed = base_seed
        self.skip = skip  #: position of image 0 in the full order ([data] skip)
        self.skipped: list[tuple[str, str]] = []
        self._datasets: dict[Any, Any] = {}
        if folder is not None:
            from hessdiff.eval.data import ImageFolderDataset

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = ImageFolderDataset(folder, None, first_n=None if first_n is None else skip + first_n,
                                        resize=resize, recursive=recursive, order=order, base_seed=base_seed,
                                        check=check)
            self.skipped = [(str(p), r) for p, r in ds.skipped]
            if self.skipped:
                warnings.warn(
                    f"{kind}: skipped {len(self.skipped)} unreadable image file(s) in {folder}; first: "
                    f"{self.skipped[0][0]} ({self.skipped[0][1]}); all are listed in sweep.json",
                    stacklevel=3,
                )
            for w in caught:
                if "unreadable" not in str(w.message):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            if skip >= len(ds):
                raise ValueError(f"skip={skip} but {folder} has only {len(ds)} readable images")
            self.files = [ds.relative_name(i) for i in range(skip, len(ds))]
            self._abs = list(ds.files)[skip:]
            # the content, not name + size: an image edited in place changes the sweep's identity
            self.hashes: list[str | None] = [_file_sha256(p) for p in self._abs]
            self.digest = hashlib.sha256(canonical_json([[f, h] for f, h in zip(self.files, self.hashes,
                                                                                strict=True)]).encode()).hexdigest()
            self._check, self._recursive = check, recursive
        else:
            from hessdiff.samplers.models import embedded_dataset

            family, part = embedded.split("-", 1)
            x = embedded_dataset("test", family=family)
            if part == "tune":
                x = x[x.shape[0] - TUNE_SIZE[family]:]
            end = x.shape[0] if first_n is None else skip + first_n
            if end > x.shape[0] or skip >= x.shape[0]:
                raise ValueError(f"skip={skip}, first_n={first_n} but embedded:{embedded} has only {x.shape[0]} "
                                 "images")
            x = x[skip:end]
            u = to_uint8(x)
            self._uint8 = u.expand(-1, 3, -1, -1).contiguous() if u.shape[1] == 1 else u
            self.files = [f"{embedded}/{skip + i:05d}" for i in range(u.shape[0])]
            self.hashes = [None] * len(self.files)
            self.digest = hashlib.sha256(self._uint8.numpy().tobytes()).hexdigest()
        #: per-image content hashes (what an item's result depends on: see work._image_identity)
        self.content: list[str] = [h if h is not None else hashlib.sha256(self._uint8[i].numpy().tobytes()).hexdigest()
                                   for i, h in enumerate(self.hashes)]
        self.ids = _unique_ids(self.files, self.hashes)
        #: image i of the shard is image skip + i of the order, with that image's seed and id
        self.seeds = [base_seed + skip + i for i in range(len(self.files))]

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict[str, Any]:
        return {"num_images": len(self), "num_skipped": len(self.skipped), "digest": self.digest}

    def load(self, i: int, resolution: tuple[int, int]) -> torch.Tensor:
        """Image ``i`` as uint8 ``[3, H, W]`` at ``resolution``."""
        if self.folder is None:
            u = self._uint8[i]
            if tuple(u.shape[1:]) != tuple(resolution):
                raise ValueError(f"embedded:{self.embedded} images are {u.shape[1]}x{u.shape[2]}, the model needs "
                                 f"{resolution[0]}x{resolution[1]}")
            return u
        ds = self._datasets.get(resolution)
        if ds is None:
            from hessdiff.eval.data import ImageFolderDataset

            ds = ImageFolderDataset(self.folder, tuple(resolution), files=self._abs, resize=self.resize,
                                    base_seed=self.base_seed, check=self._check)
            self._datasets[resolution] = ds
        u = ds.load_uint8(i)
        if u.shape[0] == 1:
            u = u.expand(3, -1, -1)
        return u


def _to_model_space(u: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float32 ``[B, channels, H, W]`` in [-1, 1] (grey = channel mean)."""
    x = from_uint8(u)
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    if channels == 3:
        return x
    raise ValueError(f"models with {channels} image channels are not supported (1 or 3)")


def _to_metric_space(x: torch.Tensor) -> torch.Tensor:
    """float ``[B, C, H, W]`` (C = 1 or 3) in [-1, 1] -> uint8 ``[B, 3, H, W]`` (what is saved as PNG)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the method returned NaN or infinite pixel values")
    u = to_uint8(x.detach().cpu())
    if u.shape[1] == 1:
        return u.expand(-1, 3, -1, -1).contiguous()
    if u.shape[1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {u.shape[1]}")
    return u


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float64), allow_pickle=False)
    return buf.getvalue()


def sampler_seed(image_seed: int | None, seed: int) -> int:
    """Seed of an item's generator: ``seed`` when generating, else a 63-bit mix of ``(image_seed, seed)``
    (``numpy.random.SeedSequence([image_seed, seed])``), so that different images get unrelated noise."""
    if image_seed is None:
        return int(seed)
    state = np.random.SeedSequence([int(image_seed), int(seed)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)
