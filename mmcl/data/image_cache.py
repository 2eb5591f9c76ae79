"""A shared, pre-decoded image cache for the benchmarks read from image files.

Decoding a JPEG and resizing it costs about 4 ms of one CPU core (230 images/s), and a
study decodes the same images in every epoch of every trial. Here each image a dataset
uses is decoded once, through the *pixel* steps of the backbone's transform (resize,
center crop, RGB), and stored as uint8 ``[N, 3, S, S]`` in a memory-mapped file. A
sample is then a uint8 tensor, read from the page cache; the *tensor* steps (``/ 255``,
mean / std) run per batch on the trial's device, in the backbone
(:class:`Uint8Pixels`, installed by :class:`mmcl.backbones.clip.ClipBackbone` on the
image tower), with the same float operations as torchvision's ``ToTensor`` and
``Normalize``: the model sees bit-identical inputs.

Entries live under ``<cache root>/images/<key>/`` (``pixels.u8`` and ``meta.json``); the
key hashes exactly what changes the pixels: the dataset's files (paths, sizes, mtimes)
and sample keys, the pixel steps (their reprs: sizes, interpolation, antialias), and
the Pillow and torchvision versions. An entry is built under a lock (``<key>.lock``;
other processes wait, bounded), in a temporary folder renamed into place at the end, so
a reader never sees half a cache and a killed build leaves nothing behind.

[choice] On a cluster the cache is per node, at a node-local path (``$MMCL_CACHE`` or
``~/.cache/mmcl``; ``options.cache_dir``), not in the study's storage: it is a function
of data every node already reads, it is large (MTIL's 253k training images at 224 px
are 38 GB), and trials read it at random, which a page cache serves and a bucket does
not. The driver builds it on its node before the first trial (``mmcl.study.preflight``);
the first trial on each other node builds it there while that node's other trials wait.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

# Bump when the stored format or the decoding here changes: old entries are then unused.
FORMAT_VERSION = 1
PIXELS = "pixels.u8"
META = "meta.json"
# A build of 253k images takes minutes on many cores and longer on few; a waiter gives up
# only when the builder has shown no progress for this long.
STALL_S = float(os.environ.get("MMCL_IMAGE_CACHE_STALL_S", 900))


def cache_root(cache_dir: str | None) -> Path:
    """``cache_dir``, or ``<$MMCL_CACHE or ~/.cache/mmcl>/images``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("MMCL_CACHE", Path.home() / ".cache" / "mmcl")).expanduser() / "images"


# --------------------------------------------------------------------------- transforms


class Uint8Pixels:
    """The tensor steps of a transform, for a batch of cached uint8 images on any device:
    ``x.float() / 255``, then ``(x - mean) / std`` per channel (torchvision's ``ToTensor``
    and ``Normalize``, same operations, same order). Float inputs pass unchanged.

    Installed as a forward pre-hook of the image tower; a plain callable object (not a
    closure) so that models holding it deep-copy and pickle."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        out = x.to(torch.float32).div(255)
        mean = torch.as_tensor(self.mean, dtype=out.dtype, device=out.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=out.dtype, device=out.device).view(-1, 1, 1)
        return out.sub_(mean).div_(std)

    def pre_hook(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if args and torch.is_tensor(args[0]) and args[0].dtype == torch.uint8:
            return (self(args[0]), *args[1:])
        return None


@dataclass(frozen=True)
class PixelSplit:
    """A transform cut into the steps that make pixels and those that make the tensor."""

    pixels: Callable[[Any], Any]  # PIL image -> PIL image (S x S, RGB)
    size: int
    tensor: Uint8Pixels
    key: str  # what the pixel steps are, for the cache key


def _step_repr(step: Any) -> str:
    import inspect

    return step.__qualname__ if inspect.isfunction(step) else repr(step)


def split_transform(transform: Any) -> PixelSplit | None:
    """Split an eval transform ``Compose([pixel steps..., ToTensor, Normalize])`` (what
    open_clip and :func:`mmcl.data.mtil.default_preprocess` build). None for anything
    else (random augmentation, unknown steps): such a run decodes every image as before."""
    from torchvision import transforms as T

    if hasattr(transform, "pixel_split"):
        return transform.pixel_split()  # a transform that knows its own split (ImageTransform)
    steps = list(getattr(transform, "transforms", []) or [])
    names = [type(s).__name__ for s in steps]
    if len(steps) < 3 or names[-1] != "Normalize" or not isinstance(steps[-2], T.ToTensor):
        return None
    pixels = steps[:-2]
    size = None
    for s in pixels:
        if isinstance(s, T.CenterCrop):
            h, w = s.size if isinstance(s.size, (tuple, list)) else (s.size, s.size)
            if h != w:
                return None
            size = int(h)
        elif isinstance(s, T.Resize):
            if isinstance(s.size, (tuple, list)) and len(s.size) == 2:  # a squash to (h, w)
                if s.size[0] != s.size[1]:
                    return None
                size = int(s.size[0])
        elif not (type(s).__name__ == "MaybeConvertMode" or "convert_to_rgb" in _step_repr(s).lower()):
            return None  # a step that may be random or unknown: do not freeze it
    if size is None:
        return None
    norm = steps[-1]
    import PIL
    import torchvision

    key = "|".join([*map(_step_repr, pixels), f"PIL {PIL.__version__}", f"torchvision {torchvision.__version__}"])

    def apply(img: Any) -> Any:
        for s in pixels:
            img = s(img)
        return img

    return PixelSplit(apply, size, Uint8Pixels(norm.mean, norm.std), key)


# --------------------------------------------------------------------------- entries


def entry_key(identity: dict[str, Any], split: PixelSplit) -> str:
    """The cache key: a hash of the samples' identity and of the pixel steps."""
    blob = json.dumps({"format": FORMAT_VERSION, "identity": identity, "pixels": split.key}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class CachedPixels:
    """The pixels of one entry: ``len()`` images, ``[i]`` a uint8 tensor ``[3, S, S]``.
    Opened lazily in each process (a DataLoader worker maps the file itself)."""

    def __init__(self, folder: Path, n: int, size: int):
        self.folder, self.n, self.size = folder, n, size
        self._array: np.memmap | None = None

    def __len__(self) -> int:
        return self.n

    def _map(self) -> np.memmap:
        if self._array is None:
            self._array = np.memmap(self.folder / PIXELS, dtype=np.uint8, mode="r", shape=(self.n, 3, self.size, self.size))
        return self._array

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._map()[i]))  # a copy: the map is read-only

    def take(self, rows: Sequence[int]) -> torch.Tensor:
        """Images ``rows`` as one uint8 batch ``[len(rows), 3, S, S]``: a single gather from
        the map, not one copy per image and another to stack them (128 images at 224 px on
        one core here: 1.4 ms against 10.5 + 9.9 ms).
        In a DataLoader worker the batch is made in shared memory, where the worker's
        queue would otherwise copy it again to hand it to the main process."""
        from torch.utils.data import get_worker_info

        out = torch.empty((len(rows), 3, self.size, self.size), dtype=torch.uint8)
        if get_worker_info() is not None:
            out.share_memory_()
        pixels, dst = self._map(), out.numpy()
        for k, i in enumerate(rows):  # row copies: as fast as fancy indexing, and in place
            dst[k] = pixels[i]  # (np.take(..., out=) was 3x slower here)
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def _decode_all(load: Callable[[int], Any], n: int, split: PixelSplit, out: np.memmap, workers: int, what: str) -> None:
    from torch.utils.data import DataLoader, Dataset

    from mmcl.progress import work_bar

    class _Decode(Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int):
            arr = np.asarray(split.pixels(load(i)), dtype=np.uint8)
            if arr.shape != (split.size, split.size, 3):
                raise ValueError(f"{what}: image {i} came out {arr.shape}, not {(split.size, split.size, 3)}")
            return i, torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    # Its own generator: a DataLoader draws a base seed when iterated, and from torch's
    # global generator that would make a run that builds the cache train differently from
    # one that finds it (dropout, sampling).
    loader = DataLoader(_Decode(), batch_size=64, num_workers=workers, collate_fn=lambda b: b,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    with work_bar(n, f"decoding {what} once into the image cache") as bar:
        for batch in loader:
            for i, img in batch:
                out[i] = img.numpy()
            bar.update(len(batch))
    out.flush()


def open_or_build(
    root: Path,
    identity: dict[str, Any],
    load: Callable[[int], Any],
    n: int,
    split: PixelSplit,
    what: str,
    workers: int | None = None,
) -> CachedPixels:
    """The entry of ``identity`` + ``split`` under ``root``, built first if absent.

    ``load(i)`` is sample i as a PIL image; ``workers`` decode in parallel (default: the
    CPUs this process may use, at most 16). Concurrent callers for the same entry wait
    for the one that builds it (the wait ends with an error if the builder shows no
    progress for ``MMCL_IMAGE_CACHE_STALL_S`` seconds)."""
    key = entry_key(identity, split)
    folder = root / key
    if (folder / META).is_file():
        return CachedPixels(folder, n, split.size)
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / f"{key}.lock"
    with open(lock_path, "a+") as lock:
        _acquire(lock, lock_path, folder, what)
        try:
            if not (folder / META).is_file():  # built by the process we waited for?
                _build(folder, identity, load, n, split, what, workers)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return CachedPixels(folder, n, split.size)


def _acquire(lock, lock_path: Path, folder: Path, what: str) -> None:
    last, seen = time.monotonic(), None
    told = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        # The builder's progress: the size of its temporary files grows as it writes.
        progress = sum(p.stat().st_size for p in folder.parent.glob(f"{folder.name}.tmp-*/{PIXELS}") if p.exists())
        if progress != seen:
            seen, last = progress, time.monotonic()
        if not told:
            log.warning("waiting for another process to build the image cache of %s (%s)", what, folder)
            told = True
        if time.monotonic() - last > STALL_S:
            raise TimeoutError(
                f"image cache of {what}: another process has held {lock_path} for {STALL_S:.0f} s without "
                f"progress; if no mmcl process is building it, delete {lock_path} (or set MMCL_IMAGE_CACHE_STALL_S)"
            )
        time.sleep(1.0)


def _build(folder: Path, identity: dict, load, n: int, split: PixelSplit, what: str, workers: int | None) -> None:
    tmp = folder.parent / f"{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        out = np.memmap(tmp / PIXELS, dtype=np.uint8, mode="w+", shape=(max(n, 1), 3, split.size, split.size))
        if workers is None:
            # Worker processes pay for themselves on real datasets, not on a few hundred images.
            workers = min(16, len(os.sched_getaffinity(0))) if n >= 2000 else 0
        t0 = time.perf_counter()
        _decode_all(load, n, split, out, workers, what)
        del out
        meta = {"what": what, "n": n, "size": split.size, "pixels": split.key, "identity": identity,
                "format": FORMAT_VERSION, "built_s": round(time.perf_counter() - t0, 1), "built_at": time.time()}  # fmt: skip
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp, folder)  # whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _OpenRGB:
    """Image i of a list of files, as RGB (picklable, for decoding workers)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __call__(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")


class CachedFiles:
    """Images of a list of files (repeats allowed) served from one entry of their unique
    files: ``[i]`` is file ``paths[i]``'s uint8 pixels."""

    def __init__(self, entry: CachedPixels, rows: list[int]):
        self.entry, self.rows = entry, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.entry[self.rows[i]]


def cached_files(paths: Sequence[str | Path], transform: Any, cache_dir: str | None, what: str,
                 identity: dict[str, Any]) -> CachedFiles | None:  # fmt: skip
    """The pixels of ``paths`` through ``transform``'s pixel steps, from the cache (built
    here on first use); None when the transform cannot be split. Each distinct file is
    stored once (COCO has five captions, VQAv2 several questions per image); the key
    covers every file's path, size and modification time."""
    split = split_transform(transform)
    if split is None:
        return None
    unique: dict[str, int] = {}
    rows = [unique.setdefault(str(p), len(unique)) for p in paths]
    h = hashlib.sha256()
    for f in unique:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    ident = {**identity, "n": len(unique), "files": h.hexdigest()}
    entry = open_or_build(cache_root(cache_dir), ident, _OpenRGB(list(unique)), len(unique), split, what)
    return CachedFiles(entry, rows)


def describe(root: Path) -> list[dict[str, Any]]:
    """Every entry under ``root`` (``mmcl cache info``): what, images, size, bytes, when."""
    rows = []
    for meta_path in sorted(root.glob(f"*/{META}")):
        meta = json.loads(meta_path.read_text())
        pixels = meta_path.parent / PIXELS
        rows.append({"key": meta_path.parent.name, "what": meta["what"], "images": meta["n"], "size": meta["size"],
                     "bytes": pixels.stat().st_size if pixels.exists() else 0, "built_s": meta.get("built_s"),
                     "built_at": meta.get("built_at")})  # fmt: skip
    return rows
