"""How much do the behaviour tests owe to one pretrained model? Their figures per recipe seed.

    MMCL_RECIPE_SEED=1 uv run python benchmarks/behaviour_spread.py [--only lwf dgg eca cma]

Runs exactly the runs of ``tests/test_benchmark_behaviour.py`` and
``tests/test_cma_benchmark_behaviour.py`` (their own helpers, so the runs cannot drift
apart) on the offline models of recipe seed $MMCL_RECIPE_SEED (0 = the default models;
any other seed pretrains its own tiny CLIP / BLIP-2 once, cached apart), and prints per
pair the quantities the tests assert: each side's BWT and Last, the gap, and the margin the
test asks for. The README's spread figures come from here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=["lwf", "dgg", "eca", "cma"])
    args = ap.parse_args()

    from mmcl.backbones.pretrain import recipe_seed
    from tests import test_benchmark_behaviour as clip_gen
    from tests import test_cma_benchmark_behaviour as paired
    from mmcl.spec import load_study

    seed = recipe_seed()
    print(f"recipe seed {seed}")
    pairs = {}
    if "lwf" in args.only:
        pairs["lwf"] = (("finetune", lambda: clip_gen._run("quickstart.yaml", "finetune")),
                        ("lwf", lambda: clip_gen._run("quickstart.yaml")), 2.0)  # fmt: skip
    if "dgg" in args.only:
        lora_cfg = load_study(REPO / "studies" / "dgg_quickstart.yaml").run.method.config["lora"]
        pairs["dgg"] = (("lora", lambda: clip_gen._run("dgg_quickstart.yaml", "lora", {"lora": lora_cfg})),
                        ("dgg", lambda: clip_gen._run("dgg_quickstart.yaml")), 2.0)  # fmt: skip
    if "eca" in args.only:
        cfg = load_study(REPO / "studies" / "eca_quickstart.yaml").run.method.config
        widths = {"attn_width": cfg["adapter_attn_width"], "ffn_width": cfg["adapter_ffn_width"]}
        pairs["eca"] = (
            ("gen_adapter", lambda: clip_gen._run("eca_quickstart.yaml", "gen_adapter", {"params": "adapters", "adapters": widths})),
            ("eca", lambda: clip_gen._run("eca_quickstart.yaml")), clip_gen.ECA_MARGIN,
        )  # fmt: skip
    if "cma" in args.only:
        for protocol, margin in (("cil", 10.0), ("dil", 3.0)):
            pairs[f"cma-{protocol}"] = (("pm_finetune", lambda p=protocol: paired._run("pm_finetune", p)),
                                        ("cma", lambda p=protocol: paired._run("cma", p)), margin)  # fmt: skip
    print("| pair | baseline BWT | method BWT | BWT gap (test asks >) | baseline Last | method Last | zero-shot row | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, ((bname, base), (mname, meth), margin) in pairs.items():
        t0 = time.perf_counter()
        b, m = base(), meth()
        gap = m.metrics["bwt"] - b.metrics["bwt"]
        row0 = " ".join(f"{v:.0f}" for v in b.matrix[0])
        print(
            f"| {name} | {b.metrics['bwt']:.1f} | {m.metrics['bwt']:.1f} | {gap:+.1f} ({margin:g}) | "
            f"{b.metrics['last']:.1f} | {m.metrics['last']:.1f} | {row0} | {(time.perf_counter() - t0) / 60:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
