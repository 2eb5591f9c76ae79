"""DAGR's training-step throughput beside DIKI's and the frozen-backbone floor.

    uv run python benchmarks/dagr_step.py                                   # tiny CLIP, CPU
    python benchmarks/dagr_step.py --model ViT-B-16 --batch 128 --amp bf16 --device cuda --classes 100

One optimisation step = forward + backward + SGD step, on one batch of random images and
the task's class prompts through the text tower (every prompt method pays both towers):

- floor: the frozen CLIP with one learnable additive prompt per tower (image space
  [3, H, W]; token-embedding space [context, width]) and all weights frozen: the least a
  method that trains inputs of a frozen CLIP can cost per step;
- DIKI: ``training_loss`` of the second task (residual key/value prompts in both towers);
- DAGR: the same, plus capture of the image tower's block outputs and attention and of the
  text tower's per-block class features, the current cross-modal graph and the three
  graph terms against the previous task's stored graph (every lambda on, every node old).

Prints ms per step and samples/s for the three, DAGR / floor throughput (target >= 85%)
and DAGR's slow-down against DIKI (target <= 25%). Weights are random (``pretrained:
null``): speed does not depend on them. Rounds alternate between the three so drifting
machine load hits them alike; medians are reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from contextlib import nullcontext

from _figures import peak_mb, reset_peak, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mmcl-tiny-clip")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=None, help="classes of the task (default: the synthetic task's)")
    ap.add_argument("--prompt-length", type=int, default=8)
    ap.add_argument("--prompt-depth", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed rounds per variant")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the figures (and each variant's peak device memory) here")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print torch.profiler's N most expensive ops of a DIKI and a DAGR step")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from mmcl.engine import prepare
    from mmcl.spec import RunSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    prompts = {"prompt_length": args.prompt_length, "prompt_depth": args.prompt_depth}

    def build(name: str, config: dict):
        run = RunSpec.model_validate({
            "device": args.device,
            "backbone": {"model": args.model, "pretrained": None},
            "benchmark": {"name": "synthetic", "num_tasks": 2,
                          "options": {"n_train_per_class": 4, "n_test_per_class": 1}},
            "method": {"name": name, "config": {**prompts, **config}},
            "training": {"optimizer": "sgd", "batch_size": args.batch},
            "evaluation": {"batch_size": args.batch, "templates": "first"},
        })  # fmt: skip
        torch.manual_seed(0)
        prep = prepare(run)
        if args.classes:  # e.g. MTIL's ~100 classes a task: the text tower's share of a step
            for i, task in enumerate(prep.tasks):
                names = [f"class number {c}" for c in range(args.classes)]
                prep.tasks[i] = dataclasses.replace(task, classnames=names, templates=["a photo of a {}."])
        return prep

    size = None
    g = torch.Generator().manual_seed(0)

    def make_batch(prep) -> dict:
        n_cls = prep.tasks[1].num_classes
        return {
            "image": torch.randn(args.batch, 3, size, size, generator=g).to(dev),
            "label": torch.randint(n_cls, (args.batch,), generator=g).to(dev),
            "task": torch.ones(args.batch, dtype=torch.long, device=dev),
        }

    # DIKI and DAGR in their second task (DAGR with the first task's nodes and graph stored).
    diki = build("diki", {})
    size = diki.backbone.image_size
    batch = make_batch(diki)
    for prep in (diki,):
        prep.method.before_task(0, prep.tasks[0])
        prep.method.before_task(1, prep.tasks[1])
    dagr = build("dagr", {"num_nodes": args.nodes, "tau": -1.0})  # tau -1: every node old, all rows count
    m = dagr.method
    m.before_task(0, dagr.tasks[0])
    with torch.no_grad():
        first = {"image": batch["image"], "label": batch["label"] % dagr.tasks[0].num_classes}
        _, text = m.class_text(dagr.tasks[0], 0)
        m.graphs = [m.build_task_graph(0, [batch["image"]], text, m.fit_nodes(0, 0, [first], text))]
    m.before_task(1, dagr.tasks[1])  # task 1's nodes, matched with task 0's graph
    graph_bytes = m.graphs[0].nbytes()

    # The floor: additive prompts on the inputs of both towers, everything else frozen.
    clip = diki.backbone.model
    task = diki.tasks[1]
    img_prompt = torch.zeros(3, size, size, device=dev, requires_grad=True)
    ctx_len = diki.backbone.tokenize(["x"]).shape[-1]
    txt_prompt = torch.zeros(ctx_len, clip.token_embedding.embedding_dim, device=dev, requires_grad=True)
    tokens = diki.backbone.tokenize([t.format(c) for c in task.classnames for t in task.templates[:1]])
    clip.token_embedding.register_forward_hook(lambda mod, inp, out: out + txt_prompt.to(out.dtype))

    def floor_loss(b) -> dict:
        feats = clip.encode_image(b["image"] + img_prompt, normalize=True).float()
        head = clip.encode_text(tokens, normalize=True).float()
        logits = diki.backbone.logit_scale() * feats @ head.T
        return {"ce": F.cross_entropy(logits, b["label"])}

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = (lambda: torch.autocast(dev.type, dtype=amp)) if amp else nullcontext

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    variants = {
        "floor": (floor_loss, [img_prompt, txt_prompt]),
        "diki": (lambda b: diki.method.training_loss(b, 1), diki.method.trainable_parameters()),
        "dagr": (lambda b: dagr.method.training_loss(b, 1), dagr.method.trainable_parameters()),
    }
    # The DAGR step must carry its graph terms (else this measures DIKI twice).
    assert {"edge", "multi", "path"} <= set(variants["dagr"][0](batch)), "DAGR graph terms missing"

    peaks: dict[str, float] = {}

    def timed_steps(name: str, n: int) -> float:
        loss_fn, params = variants[name]
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        reset_peak(dev)
        for i in range(args.warmup + n):
            if i == args.warmup:
                sync()
                t0 = time.perf_counter()
            with autocast():
                loss = sum(loss_fn(batch).values())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        peaks[name] = max(peaks.get(name, 0.0), peak_mb(dev))
        return (time.perf_counter() - t0) / n * 1e3

    rounds: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name in variants:
            rounds[name].append(timed_steps(name, args.steps))
    ms = {k: statistics.median(v) for k, v in rounds.items()}
    sps = {k: args.batch / (v / 1e3) for k, v in ms.items()}

    print(f"model {args.model}  batch {args.batch}  classes {task.num_classes}  prompts {args.prompt_length} x depth "
          f"{args.prompt_depth}  K {args.nodes}  device {args.device}  amp {args.amp}  "
          f"(stored graph {graph_bytes / 1e6:.3f} MB / task)")
    print(f"{'':<8}{'ms/step':>10}{'samples/s':>12}")
    for k in variants:
        print(f"{k:<8}{ms[k]:10.2f}{sps[k]:12.1f}")
    print(f"DAGR / floor throughput: {100 * sps['dagr'] / sps['floor']:.1f}% (target >= 85%)   "
          f"DAGR vs DIKI: {100 * (ms['dagr'] / ms['diki'] - 1):+.1f}% step time (target <= +25%)   "
          f"DIKI / floor: {100 * sps['diki'] / sps['floor']:.1f}%   [median of {args.repeats} rounds of {args.steps} steps]")
    if dev.type == "cuda":
        print("peak device memory (MiB): " + "  ".join(f"{k} {peaks[k]:.0f}" for k in variants))
    write_json(args.json, {
        "benchmark": "dagr_step", "model": args.model, "batch": args.batch, "device": args.device, "amp": args.amp,
        "ms_per_step": ms, "samples_per_s": sps, "peak_memory_mb": peaks, "graph_bytes": graph_bytes,
        "dagr_over_floor": sps["dagr"] / sps["floor"], "dagr_vs_diki": ms["dagr"] / ms["diki"] - 1,
    })  # fmt: skip

    if args.profile:
        # Where DAGR's extra time goes: the ops of a few steps, DIKI's beside DAGR's.
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        for name in ("diki", "dagr"):
            timed_steps(name, 2)  # warm
            with profile(activities=acts) as prof:
                timed_steps(name, 5)
            print(f"\n{name}: top {args.profile} ops over {args.warmup + 5} steps")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.profile))


if __name__ == "__main__":
    main()
