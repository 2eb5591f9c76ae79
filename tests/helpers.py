"""Small builders the tests share."""

from __future__ import annotations

from typing import Any

from mmcl.spec import RunSpec


def tiny_run(
    method: str = "finetune",
    config: dict[str, Any] | None = None,
    num_tasks: int = 2,
    pretrained: str | None = None,
    steps: int = 3,
    seed: int = 0,
    **training: Any,
) -> RunSpec:
    """A run of seconds: the tiny CLIP (random init unless ``pretrained``), a few
    samples per class, a few optimisation steps per task, one CPU thread."""
    return RunSpec.model_validate(
        {
            "seed": seed,
            "device": "cpu",
            "torch_threads": 1,
            "backbone": {"model": "mmcl-tiny-clip", "pretrained": pretrained},
            "benchmark": {
                "name": "synthetic",
                "num_tasks": num_tasks,
                "options": {"n_train_per_class": 8, "n_test_per_class": 4},
            },
            "method": {"name": method, "config": config or {}},
            "training": {"batch_size": 8, "max_steps": steps, "log_every": 1, "lr": 1e-3, **training},
            "evaluation": {"batch_size": 64},
        }
    )


def tiny_study(path, stages: list[dict], name: str = "tiny", method: str = "finetune", config=None,
               num_tasks: int = 3, steps: int = 3, max_concurrent: int = 2, max_failures: int = 2) -> "Path":
    """Write a study YAML whose trials take seconds (random-init tiny CLIP)."""
    from pathlib import Path

    import yaml

    run = tiny_run(method, config, num_tasks=num_tasks, steps=steps).model_dump(mode="json")
    study = {
        "name": name,
        "storage": str(Path(path).parent / "results"),
        "run": run,
        "stages": stages,
        # A stage that cannot get its CPUs (trials a killed driver left behind holding
        # them) fails within minutes, naming why, instead of waiting out the suite.
        "resources": {"cpu": 1, "gpu": 0, "wait_timeout_s": 300},
        "max_concurrent_trials": max_concurrent,
        "failure": {"max_failures": max_failures},
    }
    Path(path).write_text(yaml.safe_dump(study, sort_keys=False))
    return Path(path)


# A tiny random Audio Spectrogram Transformer (2 layers, width 32, 16 mel bins x 32 frames).
TINY_AST = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_mel_bins": 16,
    "max_length": 32,
    "patch_size": 16,
    "frequency_stride": 16,
    "time_stride": 8,
}


def tiny_paired_backbone(ast_path: str | None = None, pretrained: str | None = None) -> dict[str, Any]:
    """Paired encoders: the tiny CLIP's image tower (random unless ``pretrained``) for video,
    a tiny AST for audio (random init from TINY_AST, or loaded from ``ast_path``)."""
    audio = {"kind": "ast", "path": ast_path} if ast_path else {"kind": "ast", "config": TINY_AST}
    return {
        "kind": "paired",
        "encoders": {"video": {"kind": "open_clip_vision", "model": "mmcl-tiny-clip", "pretrained": pretrained}, "audio": audio},
    }


def tiny_paired_run(
    method: str = "cma",
    config: dict[str, Any] | None = None,
    num_tasks: int = 2,
    protocol: str = "cil",
    steps: int = 3,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    **training: Any,
) -> RunSpec:
    """A paired-track run of seconds on the generated audio-visual benchmark."""
    return RunSpec.model_validate(
        {
            "seed": seed,
            "device": "cpu",
            "torch_threads": 1,
            "backbone": tiny_paired_backbone(),
            "benchmark": {
                "name": "paired_synthetic",
                "num_tasks": num_tasks,
                "options": {"protocol": protocol, "n_train_per_class": 8, "n_test_per_class": 4,
                            "duration_s": 0.35, **(options or {})},
            },
            "method": {"name": method, "config": config or {}},
            "training": {"batch_size": 8, "max_steps": steps, "log_every": 1, "lr": 1e-3, **training},
            "evaluation": {"batch_size": 64},
        }
    )


def tiny_gen_run(
    method: str = "gen_adapter",
    config: dict[str, Any] | None = None,
    kind: str = "blip2",
    num_tasks: int = 2,
    steps: int = 3,
    seed: int = 0,
    n_train: int = 8,
    n_test: int = 6,
    **training: Any,
) -> RunSpec:
    """A generation-track run of seconds: a tiny random BLIP-2 / LLaVA (``mmcl:tiny``,
    saved once and loaded by path), the generated caption / VQA benchmark, a few steps."""
    return RunSpec.model_validate(
        {
            "seed": seed,
            "device": "cpu",
            "torch_threads": 1,
            "backbone": {"kind": kind, "path": "mmcl:tiny"},
            "benchmark": {
                "name": "synthetic_text",
                "num_tasks": num_tasks,
                "options": {"n_train": n_train, "n_test": n_test},
            },
            "method": {"name": method, "config": config or {}},
            "training": {"batch_size": 4, "max_steps": steps, "log_every": 1, "lr": 1e-3, **training},
            "evaluation": {"batch_size": 8, "max_new_tokens": 6},
        }
    )


def run_notebook(path: Path, results: Path, timeout_s: int = 300):
    """Execute a notebook top to bottom on a real kernel (nbclient) with MMCL_RESULTS set;
    any cell error raises (nbclient's CellExecutionError, naming the cell)."""
    import os

    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    old = os.environ.get("MMCL_RESULTS")
    os.environ["MMCL_RESULTS"] = str(results)  # the kernel inherits the environment
    try:
        NotebookClient(nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if old is None:
            os.environ.pop("MMCL_RESULTS", None)
        else:
            os.environ["MMCL_RESULTS"] = old
    return nb
