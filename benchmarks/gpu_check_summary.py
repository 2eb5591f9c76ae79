"""The summary table of ``gpu_check.sh``: every step's status and the figures of its JSON
files, against the targets the README states. Writes ``summary.md`` and ``summary.json``
beside them and prints the table.

    python benchmarks/gpu_check_summary.py OUT_DIR [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def _load(out: Path, name: str) -> dict:
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def tier_counts(xml: Path) -> dict[str, int]:
    if not xml.is_file():
        return {}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def summarise(out: Path, dry_run: bool) -> dict:
    steps = {}
    for line in (out / "steps.txt").read_text().splitlines():
        name, status, secs = line.split("|")
        steps[name] = {"status": status, "seconds": int(secs)}
    rows: list[tuple[str, str, str]] = []  # (figure, value, target)
    tier = tier_counts(out / "gpu_tier.xml")
    if tier:
        passed = tier["tests"] - tier["failures"] - tier["errors"] - tier["skipped"]
        rows.append(("gpu tier", f"{passed} passed, {tier['failures'] + tier['errors']} failed, {tier['skipped']} skipped",
                     "0 failed"))  # fmt: skip
    dagr = _load(out, "dagr_step")
    if dagr:
        rows.append((f"DAGR step, {dagr['model']} batch {dagr['batch']} {dagr['amp']}",
                     " / ".join(f"{k} {v:.0f}" for k, v in dagr["samples_per_s"].items()) + " samples/s", ""))
        rows.append(("DAGR / floor throughput", f"{100 * dagr['dagr_over_floor']:.1f}%", ">= 85%"))
        rows.append(("DAGR vs DIKI step time", f"{100 * dagr['dagr_vs_diki']:+.1f}%", "<= +15%"))
        if any(dagr["peak_memory_mb"].values()):
            rows.append(("DAGR step peak memory", f"{dagr['peak_memory_mb']['dagr']:.0f} MiB", ""))
    dgg = _load(out, "dgg_overhead")
    if dgg:
        rows.append((f"DGG vs LoRA step, {dgg['model']} batch {dgg['batch']}",
                     f"{dgg['ms_per_step']['lora']:.1f} / {dgg['ms_per_step']['dgg']:.1f} ms ({100 * dgg['overhead']:+.1f}%)",
                     "a few %"))  # fmt: skip
    for name, label in (("eca_blip2", "BLIP-2 OPT-2.7B shape"), ("dgg_llava", "LLaVA-1.5-7B shape")):
        gen = _load(out, name)
        for method, f in gen.get("methods", {}).items():
            mem = f" peak {f['peak_memory_mb'] / 1024:.1f} GiB" if gen["device"] == "cuda" else ""
            rows.append((f"{method} on {label if not dry_run else 'tiny ' + gen['kind']}, batch {gen['batch']}",
                         f"{f['samples_per_s']:.1f} samples/s, boundary {100 * f['boundary_over_train']:.1f}% of training,"
                         f" {f['trainable_params']:,} trainable{mem}", ""))  # fmt: skip
    loader = _load(out, "mtil_loader")
    if loader:
        demand = loader.get("demand")
        for w, r in loader["images_per_s"].items():
            rows.append((f"MTIL loader, {w} workers", f"{r:.0f} images/s" + (f" ({100 * r / demand:.0f}% of the DAGR step's {demand:.0f})" if demand else ""),
                         ">= 100% of the step" if demand else ""))  # fmt: skip
    lines = ["| step | status | s |", "| --- | --- | ---: |"]
    lines += [f"| {k} | {v['status']} | {v['seconds']} |" for k, v in steps.items()]
    lines += ["", "| figure | value | target |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if dry_run:
        lines.insert(0, "_dry run: CPU, tiny sizes; the figures say nothing about a GPU_\n")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    summary = {"dry_run": dry_run, "steps": steps, "gpu_tier": tier, "figures": [list(r) for r in rows]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(text)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    summarise(Path(args.out), args.dry_run)


if __name__ == "__main__":
    main()
