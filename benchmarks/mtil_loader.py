"""Images/s of the MTIL loader path (JPEG decode + CLIP's resize / crop / normalise in
DataLoader workers, pinned, copied to the device) against what a training step consumes.

    uv run python benchmarks/mtil_loader.py --workers 0 1 2                 # this machine
    python benchmarks/mtil_loader.py --workers 6 --device cuda --demand 2768  # a GPU node

Without ``--root`` it writes a Caltech101 tree in the ZSCL layout (101 class folders of
``--per-class`` noisy ``--photo`` JPEGs, about a photo's decode cost) to a temporary
directory and reads it through the project's own ``mtil`` builder, so the path measured is
the one trials take (``mmcl.data.mtil`` + ``mmcl.data.base.make_loader``). With ``--root``
it reads that data root's Caltech101. ``--demand`` (images/s of one training step, e.g.
``dagr_step.py``'s samples/s) prints how much of it each worker count covers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _figures import write_json


def write_caltech(root: Path, per_class: int, photo: tuple[int, int]) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = root / "caltech101" / "101_ObjectCategories"
    for c in ["BACKGROUND_Google", *(f"class_{y:03d}" for y in range(101))]:
        d = base / c
        d.mkdir(parents=True, exist_ok=True)
        for k in range(1 if c == "BACKGROUND_Google" else per_class):
            # Smooth colour plus noise: JPEG-compresses and decodes like a photograph,
            # not like a flat image (which decodes far faster).
            h, w = photo[1], photo[0]
            img = np.clip(rng.normal(128, 40, (h, w, 3)) + np.linspace(0, 80, w)[None, :, None], 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(d / f"image_{k + 1:04d}.jpg", quality=90)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="an MTIL data root (ZSCL layout) to read Caltech101 from")
    ap.add_argument("--per-class", type=int, default=16, help="images per class of the written tree")
    ap.add_argument("--photo", default="500x375", help="size of the written JPEGs (ImageNet's typical)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8, help="timed batches per round (after one warm-up batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--demand", type=float, default=None, help="images/s one training step consumes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import open_clip
    import torch

    from mmcl.data.base import collate, make_loader
    from mmcl.data.mtil import build_mtil

    dev = torch.device(args.device)
    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="mtil-loader-")
        w, h = (int(v) for v in args.photo.split("x"))
        root = str(write_caltech(Path(tmp.name), args.per_class, (w, h)))
    # The eval transform open_clip gives a CLIP of this input size (what trials use).
    preprocess = open_clip.image_transform(args.image_size, is_train=False)
    # The JPEG path (benchmarks/data_path.py compares it with the image cache).
    task = build_mtil({"layout": "zscl", "image_cache": False}, args.image_size, 0, root=root, preprocess=preprocess,
                      tasks=["Caltech101"]).tasks[0]  # fmt: skip
    need = args.batch * (args.batches + 1)
    if len(task.train) < need:
        raise SystemExit(f"{len(task.train)} training images < {need} needed; raise --per-class")

    rates: dict[int, float] = {}
    for workers in args.workers:
        per_round = []
        for _ in range(args.repeats):
            loader = make_loader(task.train, args.batch, workers, dev, collate_fn=collate, shuffle=True,
                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
            it = iter(loader)
            x = next(it)["image"].to(dev, non_blocking=True)  # warm-up: workers start, first batches
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(args.batches):
                x = next(it)["image"].to(dev, non_blocking=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            per_round.append(args.batches * args.batch / (time.perf_counter() - t0))
            del it, loader, x
        rates[workers] = statistics.median(per_round)

    print(f"MTIL loader (Caltech101, {args.photo if args.root is None else 'from ' + root} -> {args.image_size} px), "
          f"batch {args.batch}, device {args.device}  [median of {args.repeats} rounds of {args.batches} batches]")
    print(f"{'workers':>8}{'images/s':>11}{'per worker':>12}" + (f"{'of demand':>11}" if args.demand else ""))
    for workers, r in rates.items():
        line = f"{workers:>8}{r:11.0f}{r / max(workers, 1):12.0f}"
        if args.demand:
            line += f"{100 * r / args.demand:10.0f}%"
        print(line)
    write_json(args.json, {"benchmark": "mtil_loader", "batch": args.batch, "image_size": args.image_size,
                           "device": args.device, "images_per_s": {str(k): v for k, v in rates.items()},
                           "demand": args.demand})  # fmt: skip
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
