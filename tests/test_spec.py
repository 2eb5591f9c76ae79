"""Study files: every malformed one gets a clear error naming file, key and fix."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mmcl.cli import main
from mmcl.spec import RunSpec, SpecError, apply_overrides, load_study

from .conftest import REPO, mmcl_cmd

CORPUS = Path(__file__).parent / "malformed"

# file -> fragments the message must contain (besides the file's own path)
EXPECTED = {
    "empty.yaml": ["the file is empty"],
    "list_at_top.yaml": ["expected a mapping", "got a list"],
    "syntax_error.yaml": ["YAML syntax error at line 5"],
    "unknown_top_key.yaml": ["stagess: unknown key", "stages: required key is missing"],
    "unknown_method.yaml": ["run.method.name", "unknown method 'dagrr'", "registered methods: ", "finetune", "lwf"],
    "unknown_method_knob.yaml": ["run.method.config.distil_weight: unknown key"],
    "space_param_not_in_config.yaml": ["search space 'lwf'", "'method.distill_weight'", "fix: search_spaces/lwf.py"],
    "unknown_search_space.yaml": ["search_space", "unknown search space 'lwff'", "available:", "lwf"],
    "bad_stage_kind.yaml": ["stages.0", "'kind' must be one of search, ablation, orders"],
    "no_stages.yaml": ["stages:", "at least 1 item"],
    "wrong_type.yaml": ["run.training.lr", "valid number", "'fast'"],
    "unknown_variant.yaml": ["no ablation variant 'no_graph'", "full, no_distill"],
    "base_not_earlier.yaml": ["stages[0].base", "'search' is not an earlier stage"],
    "bad_named_order.yaml": ["named.mine", "each task of the run exactly once"],
    "negative_samples.yaml": ["stages.0.num_samples", "greater than or equal to 1"],
    "duplicate_stage.yaml": ["stage name 'a' is used twice"],
    "bad_override_key.yaml": ["'training.learning_rate' does not name a key of the run block"],
    "unknown_benchmark.yaml": ["run.benchmark.name", "mtill", "synthetic"],
    "tune_on_first_k_too_big.yaml": ["stages[0] (s).tune_on.first_k: 3", "the run has 3 task(s)", "fix: first_k below 3"],
    "tune_on_both.yaml": ["stages.0.tune_on", "exactly one of first_k and benchmark (got both)"],
    "tune_on_unknown_task.yaml": ["stages[0] (s).tune_on.benchmark", "colours"],
}


def test_corpus_is_complete():
    files = sorted(p.name for p in CORPUS.glob("*.yaml"))
    assert files == sorted(EXPECTED), "every malformed file needs its expected message here"
    assert len(files) >= 10


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_malformed_study_gives_clear_error(name, capsys):
    path = CORPUS / name
    with pytest.raises(SpecError) as err:
        load_study(path)
    msg = str(err.value)
    assert str(path) in msg
    for fragment in EXPECTED[name]:
        assert fragment in msg, f"{name}: {fragment!r} not in:\n{msg}"
    # Through the CLI: the same message, exit status 2, no traceback.
    assert main(["validate", str(path)]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and EXPECTED[name][0] in stderr


def test_cli_subprocess_has_no_traceback():
    r = subprocess.run(mmcl_cmd("validate", str(CORPUS / "unknown_method.yaml")), capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "unknown method 'dagrr'" in r.stderr


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SpecError, match="no such study file"):
        load_study(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        load_study(tmp_path)


def test_shipped_studies_validate_and_plan():
    """Every study in studies/ (GPU ones too) validates and plans here, without data."""
    from mmcl.study import describe_plan

    for path in sorted((REPO / "studies").glob("*.yaml")):
        study = load_study(path)
        assert study.stages, path
        plan = describe_plan(study)
        assert f"study {study.name}" in plan and "total" in plan, path


def test_mtil_dagr_is_dikis_protocol():
    """studies/mtil_dagr.yaml says "DIKI's protocol": the values of DIKI's configs/MTIL.yaml
    (SGD lr 5.0, weight decay 0, batch 128, 10 epochs, cosine to lr * 1e-3, no warmup,
    batchwise_prompt: True) and its training loop (torch.optim.SGD without momentum, no
    gradient clipping)."""
    from cl_methods import get_method_class

    study = load_study(REPO / "studies" / "mtil_dagr.yaml")
    tr = study.run.training
    assert (tr.optimizer, tr.lr, tr.momentum, tr.weight_decay, tr.grad_clip) == ("sgd", 5.0, 0.0, 0.0, None)
    assert (tr.batch_size, tr.epochs, tr.max_steps, tr.schedule, tr.warmup_steps) == (128, 10, None, "cosine", 0)
    assert tr.min_lr_ratio == 1e-3
    cfg = get_method_class(study.run.method.name).Config.model_validate(study.run.method.config)
    assert cfg.routing == "batchwise"
    assert study.run.evaluation.batch_size == 256  # DIKI tests batchwise on twice its batch


def test_overrides_are_validated():
    run = RunSpec(method={"name": "lwf"})
    new = apply_overrides(run, {"training.lr": 0.5, "method.temperature": 3.0})
    assert new.training.lr == 0.5 and new.method.config["temperature"] == 3.0
    assert run.training.lr != 0.5  # the original is untouched
    with pytest.raises(SpecError, match="greater than 0"):
        apply_overrides(run, {"training.lr": -1.0})
    with pytest.raises(SpecError, match="unknown key"):
        apply_overrides(run, {"method.nonexistent": 1})
