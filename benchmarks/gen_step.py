"""Generation-track cost: training-step throughput, and ECA's Fisher and dictionary passes
as a fraction of a task's training time.

    uv run python benchmarks/gen_step.py                                   # tiny BLIP-2, CPU
    python benchmarks/gen_step.py --path /models/blip2-opt-2.7b --device cuda --amp bf16 --batch 16
    python benchmarks/vlm_shapes.py llava-1.5-7b /tmp/llava && python benchmarks/gen_step.py \
        --kind llava --path /tmp/llava --random-weights --methods gen_dgg --device cuda --amp bf16 --batch 16

Runs each method (default: gen_adapter, gen_dgg, eca) through the real engine
(``run_continual``) on the study's run block (``studies/eca_quickstart.yaml`` unless
``--study``), with ``--steps`` optimisation steps per task, and prints per method the
training samples/s (the engine's own curves) and, per task, how long training took beside
ECA's task-boundary work: ``before_task`` (FeDEx: the new task's mean gradient and the
expansion decision) and ``after_task`` (diagonal Fisher and mean gradient of the finished
task, and the dictionary learned on its patch embeddings). Both should stay small next to
training (ECA's paper: a few percent). Evaluation time is not counted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=str(REPO / "studies" / "eca_quickstart.yaml"))
    ap.add_argument("--methods", nargs="+", default=["gen_adapter", "gen_dgg", "eca"])
    ap.add_argument("--path", default=None, help="model directory / cached hub id (default: the study's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20, help="optimisation steps per task")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--eval-samples", type=int, default=8, help="test samples per task (kept small: not timed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kind", default=None, choices=["blip2", "llava"], help="backbone kind (default: the study's)")
    ap.add_argument("--random-weights", action="store_true", help="build --path's config with random weights")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()

    import torch

    from cl_methods import get_method_class
    from mmcl.engine import run_continual
    from mmcl.spec import apply_overrides, load_study

    torch.set_num_threads(args.threads)
    base = load_study(args.study).run
    ov = {
        "device": args.device,
        "torch_threads": args.threads,
        "training.amp": args.amp,
        "training.max_steps": args.steps,
        "training.epochs": 1000.0,  # bound by max_steps
        "benchmark.num_tasks": args.tasks,
        "evaluation.max_samples": args.eval_samples,
    }
    if args.path:
        ov["backbone.path"] = args.path
    if args.batch:
        ov["training.batch_size"] = args.batch
    if args.kind:
        ov["backbone.kind"] = args.kind
        # The kind's prompt format (the study's is BLIP-2's).
        ov["backbone.prompt_format"] = "USER: {prompt} ASSISTANT:" if args.kind == "llava" else "Question: {prompt} Answer:"
    if args.random_weights:
        ov["backbone.random_weights"] = True
    base = apply_overrides(base, ov)
    figures: dict[str, dict] = {}

    print(f"backbone {base.backbone.kind} {base.backbone.path}  device {args.device}  amp {args.amp}  "
          f"batch {base.training.batch_size}  {args.steps} steps x {args.tasks} tasks")
    for name in args.methods:
        run = apply_overrides(base, {"method.name": name} if name == base.method.name else
                              {"method.name": name, "method.config": {}})
        cls = get_method_class(name)
        boundary = {"before_task": [], "after_task": []}
        originals = {hook: getattr(cls, hook) for hook in boundary}

        def timed(hook):
            def wrapper(self, *a, **kw):
                t0 = time.perf_counter()
                out = originals[hook](self, *a, **kw)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                boundary[hook].append(time.perf_counter() - t0)
                return out
            return wrapper

        for hook in boundary:  # time the method's task-boundary work, not evaluation
            setattr(cls, hook, timed(hook))
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            ends = []
            run_continual(run, on_task_end=ends.append)
        finally:
            for hook, fn in originals.items():
                setattr(cls, hook, fn)
        rates = [c["samples_per_s"] for e in ends for c in e.curves]
        train = []
        for e in ends[1:]:
            # curves hold samples/s per logged window; the task's training time is its
            # samples over that rate, summed over windows.
            steps = [c["step"] for c in e.curves]
            sizes = [s - p for s, p in zip(steps, [0, *steps[:-1]])]
            train.append(sum(n * base.training.batch_size / c["samples_per_s"] for n, c in zip(sizes, e.curves)))
        before, after = boundary["before_task"], boundary["after_task"]
        print(f"\n{name}: {statistics.median(rates):.1f} training samples/s (median over logged windows)")
        print(f"  {'task':<6}{'train s':>9}{'before_task s':>15}{'after_task s':>14}{'boundary / train':>18}")
        for t, tr in enumerate(train):
            b, a = before[t], after[t]
            print(f"  {t:<6}{tr:9.2f}{b:15.2f}{a:14.2f}{100 * (b + a) / tr:17.1f}%")
        peak = ends[-1].peak_memory_mb
        print(f"  peak memory {peak:.0f} MiB ({'device' if args.device == 'cuda' else 'process RSS'})")
        figures[name] = {
            "samples_per_s": statistics.median(rates),
            "boundary_over_train": sum(before + after) / sum(train),
            "peak_memory_mb": peak,
            "trainable_params": ends[-1].trainable_params,
        }
    if args.json:
        import json

        meta = {"kind": base.backbone.kind, "path": base.backbone.path, "device": args.device, "amp": args.amp,
                "batch": base.training.batch_size, "random_weights": args.random_weights}  # fmt: skip
        Path(args.json).write_text(json.dumps({"benchmark": "gen_step", **meta, "methods": figures}, indent=2))


if __name__ == "__main__":
    main()
