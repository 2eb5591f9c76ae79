"""Zero-shot accuracy of the offline-pretrained tiny CLIP on every ``synthetic`` task.

    uv run python benchmarks/zero_shot_synthetic.py [--cache-dir DIR] [--fresh] [--threads N]

Prints the pretraining time (0 when the checkpoint was already cached; ``--fresh`` trains
into a temporary cache to time it) and, per task, zero-shot top-1 against chance, with
the task's first template only and with its template ensemble.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mmcl-tiny-clip")
    parser.add_argument("--cache-dir", default=None, help="default: $MMCL_CACHE or ~/.cache/mmcl")
    parser.add_argument("--fresh", action="store_true", help="pretrain into a temporary cache (timing)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--n-test", type=int, default=40, help="test samples per class")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    import torch

    from mmcl.backbones import ensure_pretrained, load_backbone
    from mmcl.backbones.pretrain import checkpoint_path
    from mmcl.data import build_benchmark
    from mmcl.spec import BackboneSpec, BenchmarkSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory() if args.fresh else None
    cache_dir = tmp.name if tmp else args.cache_dir
    spec = BackboneSpec(model=args.model, pretrained="synthetic", cache_dir=cache_dir)
    cached = checkpoint_path(spec).is_file()
    t0 = time.perf_counter()
    path = ensure_pretrained(spec)
    pretrain_s = time.perf_counter() - t0
    print(f"checkpoint: {path} ({'cached' if cached else f'pretrained in {pretrain_s:.1f} s'}, "
          f"{torch.get_num_threads()} torch threads)")

    backbone = load_backbone(spec)
    bench = build_benchmark(
        BenchmarkSpec(options={"n_train_per_class": 1, "n_test_per_class": args.n_test}), backbone.image_size
    )
    print(f"{'task':<10} {'classes':>7} {'chance':>7} {'first':>7} {'all':>7}  domain")
    accs = []
    with torch.no_grad():
        for task in bench.tasks:
            row = []
            for templates in ("first", "all"):
                pred = backbone.logits(task.test.images, task, templates).argmax(-1)
                row.append(100 * (pred == task.test.labels).float().mean().item())
            accs.append(row[1])
            print(f"{task.name:<10} {task.num_classes:>7} {100 / task.num_classes:>7.1f} {row[0]:>7.1f} "
                  f"{row[1]:>7.1f}  {task.info.get('domain', '')}")
    print(f"mean zero-shot (all templates): {sum(accs) / len(accs):.1f}")
    print(f"pretraining time: {pretrain_s if not cached else 0.0:.1f} s")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
