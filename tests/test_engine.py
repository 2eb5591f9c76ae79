"""The engine: row 0 before training, exact resume, determinism, NaN detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcl.engine import NonFiniteLossError, _lr_lambda, run_continual

from .helpers import tiny_run


def test_rows_and_order():
    ends = []
    result = run_continual(tiny_run("finetune", num_tasks=3), on_task_end=ends.append)
    assert [e.step for e in ends] == [0, 1, 2, 3]
    assert [e.trained_task for e in ends] == [None, *result.task_names]
    assert result.matrix.shape == (4, 3)
    # Each row scores every task of the benchmark, seen and unseen.
    assert all(len(e.row) == 3 for e in ends)
    assert ends[-1].done and not ends[1].done
    # Training changed the model: some row after training differs from row 0.
    assert not np.allclose(result.matrix[1:], result.matrix[0])
    assert result.trainable_params > 0
    assert all(c["loss"] == c["loss"] for e in ends for c in e.curves)


def test_same_seed_same_numbers_and_other_seed_differs():
    a = run_continual(tiny_run("lwf", num_tasks=2, steps=4))
    b = run_continual(tiny_run("lwf", num_tasks=2, steps=4))
    c = run_continual(tiny_run("lwf", num_tasks=2, steps=4, seed=1))
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert [x["loss"] for x in a.curves] == [x["loss"] for x in b.curves]
    assert [x["loss"] for x in a.curves] != [x["loss"] for x in c.curves]


@pytest.mark.parametrize("method,config", [("er", {"buffer_size": 12}), ("finetune", {})])
def test_resume_from_any_task_is_exact(method, config):
    run = tiny_run(method, config, num_tasks=3, steps=4, reset_optimizer=False)
    states = {}
    full = run_continual(run, on_task_end=lambda e: states.__setitem__(e.step, e.state))
    for k in (0, 1, 2):
        resumed_rows = []
        resumed = run_continual(run, on_task_end=lambda e: resumed_rows.append(e.step), resume=states[k])
        assert resumed_rows == list(range(k + 1, 4))
        np.testing.assert_array_equal(resumed.matrix, full.matrix)
        assert resumed.trainable_params == full.trainable_params


def test_resume_of_a_finished_run_reports_its_result_and_trains_nothing():
    run = tiny_run("finetune", num_tasks=2, steps=4)
    states, ends = {}, []
    full = run_continual(run, on_task_end=lambda e: states.__setitem__(e.step, e.state))
    resumed = run_continual(run, on_task_end=ends.append, resume=states[2])
    assert [e.step for e in ends] == [2] and ends[0].done and ends[0].curves == []
    assert ends[0].metrics == full.metrics and ends[0].trainable_params == full.trainable_params
    np.testing.assert_array_equal(resumed.matrix, full.matrix)
    assert resumed.curves == []  # no optimisation step was taken


def test_inconsistent_resume_state_is_rejected():
    states = {}
    run = tiny_run("finetune", num_tasks=2)
    run_continual(run, on_task_end=lambda e: states.__setitem__(e.step, e.state))
    bad = {**states[1], "matrix": states[2]["matrix"]}  # 3 rows for 1 completed task
    with pytest.raises(ValueError, match="inconsistent"):
        run_continual(run, resume=bad)


def test_resume_state_of_another_run_is_rejected():
    states = {}
    run_continual(tiny_run("finetune", num_tasks=2), on_task_end=lambda e: states.__setitem__(e.step, e.state))
    other = tiny_run("finetune", num_tasks=3)
    with pytest.raises(ValueError, match="does not belong to this run"):
        run_continual(other, resume=states[1])


def test_nan_loss_is_detected_with_its_task_and_term():
    with pytest.raises(NonFiniteLossError, match=r"task 0 .*non-finite terms: ce"):
        run_continual(tiny_run("finetune", num_tasks=2, lr=1e30, grad_clip=None, optimizer="sgd", steps=20))


def test_schedule_warmup_then_cosine():
    f = _lr_lambda(total=10, warmup=2, schedule="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert f(6) < f(4) < f(2)


def test_grad_clip_bounds_the_update():
    # With SGD (no momentum) one clipped step moves the parameters by at most lr * clip.
    run = tiny_run("finetune", num_tasks=1, steps=1, optimizer="sgd", momentum=0.0, lr=1.0, grad_clip=1e-3,
                   schedule="constant")
    from mmcl.engine import prepare

    prep = prepare(run)
    before = torch.cat([p.detach().flatten().clone() for p in prep.method.trainable_parameters()])
    run_continual(run, prepared=prep)
    after = torch.cat([p.detach().flatten() for p in prep.method.trainable_parameters()])
    assert 0 < torch.linalg.vector_norm(after - before) <= 1e-3 * 1.0001


def test_data_workers_change_where_samples_load_not_the_results():
    # DIKI also makes its own pass over each task (the Gaussian fit) through ctx.loader.
    run = tiny_run("diki", {"prompt_depth": 1, "prompt_length": 2}, num_tasks=2, steps=2)
    base = run_continual(run)
    workers = run_continual(run.model_copy(update={"data_workers": 2}))
    np.testing.assert_array_equal(np.array(base.matrix), np.array(workers.matrix))
    assert [c["loss"] for c in base.curves] == [c["loss"] for c in workers.curves]


class _Payload:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    from mmcl.engine import load_state_file

    monkeypatch.chdir(tmp_path)
    states = {}
    run_continual(tiny_run("finetune", num_tasks=1), on_task_end=lambda e: states.__setitem__(e.step, e.state))
    good = tmp_path / "good.pt"
    torch.save({"engine": states[1], "elapsed_s": 1.0}, good)
    assert load_state_file(good)["engine"]["completed"] == 1
    bad = tmp_path / "bad.pt"
    torch.save({"engine": states[1], "extra": _Payload()}, bad)
    with pytest.raises(ValueError, match="refused to load"):
        load_state_file(bad)
    assert not (tmp_path / "pwned").exists()


def test_faa_weighted_uses_full_test_sizes_when_evaluation_is_capped(tmp_path):
    """evaluation.max_samples scores 10 samples per task, but faa_weighted weights each task
    by its whole test set (4 test images per class: shapes 5 classes, colors 6, patterns
    4), in the engine's metrics, in the results tables read back, and after a resume."""
    from analysis import load
    from analysis.metrics import cl_metrics
    from mmcl.results import TrialWriter, consolidate

    run = tiny_run("finetune", num_tasks=3, steps=2, lr=1e-2)
    run = run.model_copy(update={"evaluation": run.evaluation.model_copy(update={"max_samples": 10})})
    ends = []
    result = run_continual(run, on_task_end=ends.append)
    full = {"shapes": 5 * 4, "colors": 6 * 4, "patterns": 4 * 4}
    assert result.task_names == list(full)
    assert ends[-1].n_samples == full and ends[-1].n_eval == dict.fromkeys(full, 10)
    last = result.matrix[-1]
    w = np.array([full[n] for n in result.task_names], dtype=float)
    expected = float((w * last).sum() / w.sum())  # (20 R31 + 24 R32 + 16 R33) / 60
    assert result.metrics["faa_weighted"] == pytest.approx(expected, abs=1e-9)
    assert expected != pytest.approx(float(last.mean()), abs=1e-6)  # the capped (equal) weights differ
    # a partial row weights only the trained tasks: after task 2, (20 R21 + 24 R22) / 44
    r2 = ends[2].matrix[2]
    assert ends[2].metrics["faa_weighted"] == pytest.approx((20 * r2[0] + 24 * r2[1]) / 44, abs=1e-9)

    # The results tables carry both counts, and analysis computes the same value from them.
    writer = TrialWriter(tmp_path, "s", "stage", "t0", {"variant": "full", "order_id": 0, "seed": 0})
    for e in ends:
        writer.write_step(e)
    consolidate(tmp_path)
    acc = load(tmp_path).accuracy
    assert set(acc["n_samples"]) == set(full.values()) and set(acc["n_eval"]) == {10}
    assert cl_metrics(acc)["faa_weighted"].iloc[0] == pytest.approx(expected, abs=1e-9)

    # Resume from after task 2 (and from the finished run): same sizes and metric.
    for k in (2, 3):
        res_ends = []
        resumed = run_continual(run, resume=ends[k].state, on_task_end=res_ends.append)
        assert res_ends[-1].n_samples == full and res_ends[-1].n_eval == dict.fromkeys(full, 10)
        assert resumed.metrics["faa_weighted"] == pytest.approx(expected, abs=1e-9)
