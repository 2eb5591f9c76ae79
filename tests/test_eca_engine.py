"""ECA through the engine: a tiny random BLIP-2 (``mmcl:tiny``) on the generated caption /
VQA stream, trained, evaluated (generated strings scored by CIDEr / VQA accuracy) and
resumed from a task boundary."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmcl.spec import RunSpec


def eca_run(config: dict | None = None, num_tasks: int = 2, steps: int = 3) -> RunSpec:
    small = {
        "adapter_attn_width": 4,
        "adapter_ffn_width": 8,
        "dictionary_size": 32,
        "sparsity": 0.1,
        "patches_per_image": 4,
        "dictionary_max_images": 8,
        "dictionary_batch_size": 16,
        "fisher_max_samples": 4,
        "replay_batch_size": 8,
        "sparse_max_iter": 50,
    }
    return RunSpec.model_validate(
        {
            "seed": 0,
            "device": "cpu",
            "torch_threads": 1,
            "backbone": {"kind": "blip2", "path": "mmcl:tiny"},
            "benchmark": {"name": "synthetic_text", "num_tasks": num_tasks, "options": {"n_train": 8, "n_test": 4}},
            "method": {"name": "eca", "config": {**small, **(config or {})}},
            "training": {"batch_size": 4, "max_steps": steps, "log_every": 1, "lr": 1e-2},
            "evaluation": {"batch_size": 4, "max_new_tokens": 4},
        }
    )


def test_eca_trains_evaluates_and_resumes_exactly():
    from mmcl.engine import prepare, run_continual

    run = eca_run()
    ends = []
    p = prepare(run)
    full = run_continual(run, on_task_end=ends.append, prepared=p)
    assert full.matrix.shape == (3, 2) and np.isfinite(full.matrix).all()
    terms = {k for c in full.curves for k in c if k.startswith("loss/")}
    assert {"loss/ce", "loss/orth", "loss/key", "loss/replay"} <= terms
    method = p.method
    assert method.moq.num_tasks == 2 and method.dictionary.ready
    # mmcl:tiny: Q-Former 2 x 64 with cross-attention on every 2nd layer, widths 4 / 8,
    # ViT 64, 8 queries, OPT 64; the projection is among what trains (ECA's opt_proj).
    from tests.test_eca import eca_trainable_count

    assert full.trainable_params == eca_trainable_count(2, 2, 64, 4, 8, 64, 8, 64)
    assert method.dictionary.fitted.all()
    assert len(method.adapter_of_task) == 2
    # Task 1's key and offset trained; task 0's stayed as task 0 left them.
    state_after_0 = ends[1].state["method"]
    torch.testing.assert_close(method.moq.keys[0].detach().cpu(), state_after_0["modules"]["moq.keys.0"], rtol=0, atol=0)

    resumed = run_continual(run, resume=copy.deepcopy(ends[1].state))
    np.testing.assert_array_equal(resumed.matrix, full.matrix)
    assert [c["loss"] for c in resumed.curves] == [c["loss"] for c in full.curves if c["task"] == 1]


def test_eca_rejects_a_clip_backbone():
    from mmcl.spec import SpecError, check_track

    run = eca_run().model_dump()
    run["backbone"] = {"kind": "open_clip"}
    with pytest.raises(SpecError, match="generation-track"):
        check_track(RunSpec.model_validate(run))
