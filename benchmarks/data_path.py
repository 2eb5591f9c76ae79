"""Images/s of the two MTIL data paths, side by side: JPEG decode + resize in DataLoader
workers, against the image cache (mmcl/data/image_cache.py: uint8 pixels from a
memory-mapped file, normalised per batch on the device), at 224 px.

    uv run python benchmarks/data_path.py                          # this machine
    python benchmarks/data_path.py --workers 0 1 2 4 --device cuda   # a GPU node

It writes a Caltech101 tree of photo-like JPEGs (benchmarks/mtil_loader.py's) to a
temporary directory, reads it through the project's own ``mtil`` builder and
``make_loader`` (the trials' path), builds the cache once (its build time is printed),
and times ``--batches`` JPEG batches (``--cache-batches`` cache batches, drawn with
replacement) per round, ``--repeats`` rounds, alternating the paths
so that both see the same machine load. A batch counts once it is on the device as the
model's input: the float batch for JPEG; for the cache, the uint8 batch normalised on
the device (on a CPU device also timed without, since a GPU takes that work off the CPU). ``--demand`` is the
images/s a training step consumes (default 2,768: a ViT-B/16 prompt step at batch 256 on
an H100, issue #19); the last columns say how much of it each path covers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _figures import write_json
from mtil_loader import write_caltech


def _rate(task, workers: int, batch: int, batches: int, dev, finish) -> float:
    import torch

    from mmcl.data.base import collate, make_loader

    # Drawn with replacement: as many batches as asked for, with no epoch boundary.
    sampler = torch.utils.data.RandomSampler(task.train, replacement=True, num_samples=batch * (batches + 1),
                                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    loader = make_loader(task.train, batch, workers, dev, collate_fn=collate, sampler=sampler)
    it = iter(loader)
    x = finish(next(it)["image"].to(dev, non_blocking=True))  # warm-up: workers start
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(batches):
        x = finish(next(it)["image"].to(dev, non_blocking=True))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    rate = batches * batch / (time.perf_counter() - t0)
    del it, loader, x
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=16, help="images per class of the written tree (101 classes)")
    ap.add_argument("--photo", default="500x375", help="size of the written JPEGs (ImageNet's typical)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8, help="timed JPEG batches per round (after one warm-up batch)")
    ap.add_argument("--cache-batches", type=int, default=80, help="timed cache batches per round (it is ~40x faster)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--demand", type=float, default=2768.0, help="images/s one training step consumes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import open_clip
    import torch

    from mmcl.data import image_cache
    from mmcl.data.mtil import build_mtil

    torch.set_num_threads(1)  # the main process's share; workers are the parallelism measured
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="data-path-") as tmp:
        w, h = (int(v) for v in args.photo.split("x"))
        root = str(write_caltech(Path(tmp) / "data", args.per_class, (w, h)))
        preprocess = open_clip.image_transform(args.image_size, is_train=False)
        finish = image_cache.split_transform(preprocess).tensor

        def build(cache: bool):
            opts = {"layout": "zscl", "image_cache": cache, "cache_dir": str(Path(tmp) / "cache")}
            return build_mtil(opts, args.image_size, 0, root=root, preprocess=preprocess, tasks=["Caltech101"]).tasks[0]

        jpeg = build(False)
        t0 = time.perf_counter()
        cached = build(True)
        build_s = time.perf_counter() - t0
        # On a GPU the cache path's normalisation runs on the device, off the CPU; on this
        # CPU-only machine it would run on the same cores as the loader, so the CPU
        # figure is taken both ways: the uint8 batch delivered ("cache") and with the
        # normalisation done here as well ("cache+norm", what a CPU-only trial sees).
        paths = {"jpeg": (jpeg, finish, args.batches),
                 "cache": (cached, finish if dev.type == "cuda" else (lambda x: x), args.cache_batches)}  # fmt: skip
        if dev.type != "cuda":
            paths["cache+norm"] = (cached, finish, args.batches)
        rates: dict[str, dict[int, list[float]]] = {p: {} for p in paths}
        for workers in args.workers:
            for _ in range(args.repeats):
                for name, (task, fin, batches) in paths.items():
                    rates[name].setdefault(workers, []).append(_rate(task, workers, args.batch, batches, dev, fin))
        n_cached = len(cached.train) + len(cached.test)

    med = {p: {k: statistics.median(v) for k, v in r.items()} for p, r in rates.items()}
    print(f"MTIL data path (Caltech101, {args.photo} JPEGs -> {args.image_size} px), batch {args.batch}, device "
          f"{args.device}  [median of {args.repeats} rounds of {args.batches} JPEG / {args.cache_batches} cache batches; paths alternated]")
    print(f"cache built once: {n_cached} images in {build_s:.1f} s ({n_cached / build_s:.0f} images/s)")
    norm = "cache+norm" in med
    print(f"{'workers':>8}{'JPEG img/s':>12}{'cache img/s':>13}" + (f"{'cache+norm':>12}" if norm else "")
          + f"{'ratio':>8}{'JPEG of demand':>16}{'cache of demand':>17}")  # fmt: skip
    for workers in args.workers:
        j, c = med["jpeg"][workers], med["cache"][workers]
        extra = f"{med['cache+norm'][workers]:12.0f}" if norm else ""
        print(f"{workers:>8}{j:12.0f}{c:13.0f}{extra}{c / j:7.1f}x{100 * j / args.demand:15.0f}%{100 * c / args.demand:16.0f}%")
    if norm:
        print("cache: the uint8 batch delivered (a GPU normalises it); cache+norm: normalised on this CPU too")
    write_json(args.json, {"benchmark": "data_path", "batch": args.batch, "image_size": args.image_size,
                           "device": args.device, "demand": args.demand, "cache_build_s": build_s,
                           "images_per_s": {p: {str(k): v for k, v in r.items()} for p, r in med.items()}})  # fmt: skip


if __name__ == "__main__":
    main()
