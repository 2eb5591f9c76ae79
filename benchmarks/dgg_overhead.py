"""DGG's per-step cost against plain LoRA fine-tuning (the same model, batch and LoRA).

    uv run python benchmarks/dgg_overhead.py                          # tiny CLIP, CPU
    python benchmarks/dgg_overhead.py --model ViT-B-16 --batch 64 --amp bf16 --device cuda

DGG adds one vector operation per trainable tensor after backward (g += capped
theta - theta*), so its step should cost a few percent more at most. Worst case measured
here: alpha = 1 (the pull is added on every step). Prints ms per optimisation step
(forward + backward + guidance + AdamW step) for both, the overhead, and the guidance
operation alone. Weights are random (``pretrained: null``): speed does not depend on them.
The replay half of DGG changes how much data a task has, not what a step costs, so the
buffer is off here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

from _figures import peak_mb, reset_peak, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mmcl-tiny-clip")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--towers", default="image", choices=["image", "text", "both"])
    ap.add_argument("--norm", default="global", choices=["per_tensor", "global"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed rounds per method")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the figures (and each variant's peak device memory) here")
    args = ap.parse_args()

    import torch

    from cl_methods._guidance import add_guidance
    from mmcl.engine import prepare
    from mmcl.spec import RunSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    lora = {"rank": args.rank, "alpha": 2.0 * args.rank, "towers": args.towers}

    def build(name: str, config: dict):
        run = RunSpec.model_validate({
            "device": args.device,
            "backbone": {"model": args.model, "pretrained": None},
            "benchmark": {"name": "synthetic", "num_tasks": 2, "options": {"n_train_per_class": 2, "n_test_per_class": 1}},
            "method": {"name": name, "config": {"lora": lora, **config}},
        })  # fmt: skip
        torch.manual_seed(0)
        return prepare(run)

    plain = build("lora", {})
    dgg = build("dgg", {"alpha": 1.0, "buffer_size": 0, "norm": args.norm})
    task = dgg.tasks[0]
    # theta* from "the previous task": the current LoRA weights, moved a little so that
    # g_hat is not zero and the cap is exercised.
    params = dgg.method.trainable_parameters()
    dgg.method.guide.start_task(0, params)
    dgg.method.guide.snapshot()
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    dgg.method.guide.start_task(1, params)

    size = plain.backbone.image_size
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(args.batch, 3, size, size, generator=g).to(dev),
        "label": torch.randint(task.num_classes, (args.batch,), generator=g).to(dev),
        "task": torch.zeros(args.batch, dtype=torch.long, device=dev),
    }
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = (lambda: torch.autocast(dev.type, dtype=amp)) if amp else nullcontext

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    peaks: dict[str, float] = {}

    def timed_steps(name: str, prep, n: int) -> float:
        method = prep.method
        opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-4)
        reset_peak(dev)
        for i in range(args.warmup + n):
            if i == args.warmup:
                sync()
                t0 = time.perf_counter()
            with autocast():
                loss = sum(method.training_loss(batch, 0).values())
            loss.backward()
            method.after_backward(i)
            method.after_clip(i)  # where DGG adds its guidance (after the engine's clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        peaks[name] = max(peaks.get(name, 0.0), peak_mb(dev))
        return (time.perf_counter() - t0) / n * 1e3

    rounds = {"lora": [], "dgg": []}
    for _ in range(args.repeats):  # alternate so drifting machine load hits both alike
        rounds["lora"].append(timed_steps("lora", plain, args.steps))
        rounds["dgg"].append(timed_steps("dgg", dgg, args.steps))
    ms = {k: statistics.median(v) for k, v in rounds.items()}

    # The guidance operation alone, on gradients of the real shapes.
    for p in params:
        p.grad = torch.randn_like(p)
    star = dgg.method.guide.theta_star
    for _ in range(args.warmup):
        add_guidance(params, star, True, args.norm)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        add_guidance(params, star, True, args.norm)
    sync()
    op_ms = (time.perf_counter() - t0) / args.steps * 1e3

    n_params = sum(p.numel() for p in params)
    print(f"model {args.model}  batch {args.batch}  LoRA rank {args.rank} on {args.towers} "
          f"({n_params:,} params in {len(params)} tensors)  device {args.device}  amp {args.amp}  norm {args.norm}")
    print(f"{'':<24}{'ms/step':>10}")
    print(f"{'LoRA fine-tune':<24}{ms['lora']:10.2f}")
    print(f"{'DGG (alpha = 1)':<24}{ms['dgg']:10.2f}")
    print(f"overhead: {100 * (ms['dgg'] / ms['lora'] - 1):+.1f}%   guidance op alone: {op_ms:.3f} ms "
          f"({100 * op_ms / ms['lora']:.1f}% of a LoRA step)   [median of {args.repeats} rounds of {args.steps} steps]")
    if dev.type == "cuda":
        print(f"peak device memory (MiB): LoRA {peaks['lora']:.0f}  DGG {peaks['dgg']:.0f}")
    write_json(args.json, {
        "benchmark": "dgg_overhead", "model": args.model, "batch": args.batch, "device": args.device, "amp": args.amp,
        "rank": args.rank, "ms_per_step": ms, "overhead": ms["dgg"] / ms["lora"] - 1, "guidance_op_ms": op_ms,
        "peak_memory_mb": peaks,
    })  # fmt: skip


if __name__ == "__main__":
    main()
