"""Metric definitions: ZSCL's published MTIL numbers, hand-computed matrices, edge cases."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.metrics import METRIC_NAMES, cl_metrics, matrix_metrics

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "zscl_mtil"
# Order II as Order-I indices (fixture README): rows and columns of t9_* are permuted by it.
ORDER_II = [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2]
MTIL_ORDER_I = [
    "Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST",
    "OxfordPet", "StanfordCars", "SUN397",
]  # fmt: skip


def long_form(R: np.ndarray, names: list[str], zero_shot: bool, n_samples: list[int] | None = None,
              trial_id: str = "t", seed: int = 0, positions: bool = True) -> pd.DataFrame:  # fmt: skip
    """Long-form accuracy rows of matrix R (columns in training order), shuffled."""
    first = 0 if zero_shot else 1
    rows = []
    for r, values in enumerate(R):
        step = r + first
        for pos, (name, v) in enumerate(zip(names, values)):
            row = {
                "trial_id": trial_id,
                "step": step,
                "trained_task": names[step - 1] if step else "",
                "eval_task": name,
                "value": float(v),
            }
            if positions:
                row["eval_position"] = pos
            if n_samples is not None:
                row["n_samples"] = n_samples[pos]
            rows.append(row)
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _zscl_cases() -> list[str]:
    if not (FIXTURES / "published.json").exists():
        return []
    return sorted(json.loads((FIXTURES / "published.json").read_text()))


def _zscl_matrix(name: str) -> tuple[np.ndarray, list[str]]:
    m = np.load(FIXTURES / f"{name}.npy").reshape(11, 12)
    m = np.delete(m, 2, axis=1)  # CIFAR10 is not an MTIL task
    names = list(MTIL_ORDER_I)
    if name.startswith("t9"):
        m = m[np.ix_(ORDER_II, ORDER_II)]
        names = [names[i] for i in ORDER_II]
    return m, names


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"ZSCL MTIL golden fixtures not found at {FIXTURES}")
def test_zscl_published_numbers() -> None:
    published = json.loads((FIXTURES / "published.json").read_text())
    assert len(published) == 13
    frames = []
    for i, name in enumerate(sorted(published)):
        m, names = _zscl_matrix(name)
        assert m.shape == (11, 11)
        frames.append(long_form(m, names, zero_shot=False, trial_id=name, seed=i, positions=(i % 2 == 0)))
    df = pd.concat(frames).sample(frac=1.0, random_state=7)
    got = cl_metrics(df).set_index("trial_id")
    checked = 0
    for name, entry in published.items():
        for metric, value in entry["published"].items():
            assert round(float(got.loc[name, metric]), 1) == value, (name, metric, got.loc[name, metric], value)
            checked += 1
    assert checked == 39
    assert (got["n_tasks_trained"] == 11).all()
    assert got["fwt"].isna().all()  # no zero-shot row: no reference for forward transfer


def test_zscl_matrix_metrics_direct() -> None:
    if not FIXTURES.is_dir():
        pytest.skip(f"ZSCL MTIL golden fixtures not found at {FIXTURES}")
    m, _ = _zscl_matrix("t3_7")
    assert round(matrix_metrics(m, zero_shot=False)["transfer"], 1) == 68.1


# Hand-computed 3-task example, rows = steps 0..3, columns in training order.
R3 = np.array([
    [10.0, 20.0, 30.0],
    [80.0, 25.0, 35.0],
    [70.0, 90.0, 40.0],
    [60.0, 85.0, 95.0],
])  # fmt: skip


def test_hand_computed_full_matrix() -> None:
    m = matrix_metrics(R3, zero_shot=True, n_samples=np.array([100, 300, 600]))
    assert m["n_tasks_trained"] == 3
    assert m["avg"] == pytest.approx((80 + 25 + 35 + 70 + 90 + 40 + 60 + 85 + 95) / 9)
    assert m["last"] == pytest.approx((60 + 85 + 95) / 3)
    # column 2 seen by row 1; column 3 by rows 1..2
    assert m["transfer"] == pytest.approx((25 + (35 + 40) / 2) / 2)
    assert m["faa"] == pytest.approx((60 + 85 + 95) / 3)
    assert m["acc_seen"] == m["faa"]
    assert m["faa_weighted"] == pytest.approx((60 * 100 + 85 * 300 + 95 * 600) / 1000)
    assert m["bwt"] == pytest.approx(((60 - 80) + (85 - 90)) / 2)
    assert m["fwt"] == pytest.approx(((25 - 20) + (40 - 30)) / 2)
    assert m["forgetting"] == pytest.approx(((80 - 60) + (90 - 85)) / 2)


def test_forgetting_uses_the_peak_not_the_diagonal() -> None:
    # Task 1 improves after task 2 (70 > 50): forgetting counts from that peak, bwt from the
    # diagonal, so forgetting != -bwt; fwt uses R[j-1][j], not the diagonal R[j][j].
    R = np.array([
        [0.0, 5.0, 10.0],
        [50.0, 10.0, 10.0],
        [70.0, 60.0, 20.0],
        [40.0, 55.0, 80.0],
    ])  # fmt: skip
    m = matrix_metrics(R)
    assert m["bwt"] == pytest.approx(((40 - 50) + (55 - 60)) / 2)  # -7.5
    assert m["forgetting"] == pytest.approx(((70 - 40) + (60 - 55)) / 2)  # 17.5
    assert m["fwt"] == pytest.approx(((10 - 5) + (20 - 10)) / 2)  # 7.5
    assert m["transfer"] == pytest.approx((10 + (10 + 20) / 2) / 2)  # 12.5
    assert m["avg"] == pytest.approx((50 + 70 + 40 + 10 + 60 + 55 + 10 + 20 + 80) / 9)


def test_zero_shot_false_drops_fwt_only() -> None:
    m = matrix_metrics(R3[1:], zero_shot=False)
    ref = matrix_metrics(R3, zero_shot=True)
    assert math.isnan(m["fwt"]) and math.isnan(m["faa_weighted"])
    for k in ("avg", "last", "transfer", "bwt", "forgetting", "faa"):
        assert m[k] == pytest.approx(ref[k])


def test_partial_matrix_stopped_early() -> None:
    # 2 of 3 tasks trained: rows 0..2; the untrained third column still counts in avg/last.
    m = matrix_metrics(R3[:3], zero_shot=True, n_samples=[100, 300, 600])
    assert m["n_tasks_trained"] == 2
    assert m["avg"] == pytest.approx((80 + 25 + 35 + 70 + 90 + 40) / 6)
    assert m["last"] == pytest.approx((70 + 90 + 40) / 3)
    assert m["transfer"] == pytest.approx((25 + (35 + 40) / 2) / 2)
    assert m["faa"] == pytest.approx((70 + 90) / 2)
    assert m["faa_weighted"] == pytest.approx((70 * 100 + 90 * 300) / 400)
    assert m["bwt"] == pytest.approx(70 - 80)
    assert m["fwt"] == pytest.approx(25 - 20)
    assert m["forgetting"] == pytest.approx(80 - 70)
    one = matrix_metrics(R3[:2], zero_shot=True)
    assert one["n_tasks_trained"] == 1
    assert one["avg"] == pytest.approx((80 + 25 + 35) / 3)
    assert one["transfer"] == pytest.approx((25 + 35) / 2)
    assert one["faa"] == 80
    assert all(math.isnan(one[k]) for k in ("bwt", "fwt", "forgetting"))


def test_zero_tasks_trained_is_all_nan_and_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for R, zs in ((R3[:1], True), (np.empty((0, 3)), False), (np.empty((0, 0)), True)):
            m = matrix_metrics(R, zero_shot=zs, n_samples=np.array([1, 2, 3]))
            assert m["n_tasks_trained"] == 0
            assert set(METRIC_NAMES) <= set(m)
            assert all(math.isnan(m[k]) for k in METRIC_NAMES)


def test_cl_metrics_matches_matrix_metrics_and_derives_order() -> None:
    names = ["cars", "aircraft", "dtd"]  # training order is not alphabetical
    df = long_form(R3, names, zero_shot=True, n_samples=[100, 300, 600], positions=False)
    got = cl_metrics(df).iloc[0]
    ref = matrix_metrics(R3, zero_shot=True, n_samples=np.array([100, 300, 600]))
    for k in METRIC_NAMES:
        assert got[k] == pytest.approx(ref[k], nan_ok=True), k
    assert got["n_tasks_trained"] == 3 and got["n_tasks"] == 3


def test_cl_metrics_weights_by_full_test_sizes_not_the_evaluated_count() -> None:
    """Rows from a run with evaluation.max_samples: n_eval (50 scored per task) is not the
    weight; n_samples (the full test sets 100 / 300 / 600) is."""
    names = ["cars", "aircraft", "dtd"]
    df = long_form(R3, names, zero_shot=True, n_samples=[100, 300, 600])
    df["n_eval"] = 50
    got = cl_metrics(df).iloc[0]
    assert got["faa_weighted"] == pytest.approx((60 * 100 + 85 * 300 + 95 * 600) / 1000)
    assert got["faa_weighted"] != pytest.approx(got["faa"])  # equal (capped) weights would give FAA


def test_cl_metrics_untrained_tasks_follow_in_name_order() -> None:
    # Stopped after "zeta": the two untrained tasks become columns 2, 3 sorted by name.
    R = np.array([[1.0, 2.0, 3.0], [50.0, 20.0, 30.0]])
    df = long_form(R, ["zeta", "alpha", "beta"], zero_shot=True, positions=False)
    df = df[df["step"] <= 1]
    df.loc[df["step"] == 1, "trained_task"] = "zeta"
    got = cl_metrics(df).iloc[0]
    assert got["n_tasks_trained"] == 1
    assert got["transfer"] == pytest.approx((20 + 30) / 2)
    assert got["faa"] == pytest.approx(50)


def test_cl_metrics_several_trials_and_stage_key() -> None:
    a = long_form(R3, list("ABC"), zero_shot=True, trial_id="a")
    b = long_form(R3[:3], list("ABC"), zero_shot=True, trial_id="b")
    df = pd.concat([a, b]).assign(stage="s")
    out = cl_metrics(df).set_index("trial_id")
    assert list(out.index) == ["a", "b"] and (out["stage"] == "s").all()
    assert out.loc["b", "n_tasks_trained"] == 2


def test_duplicate_pair_raises_naming_trial() -> None:
    df = long_form(R3, list("ABC"), zero_shot=True, trial_id="trial_42")
    df = pd.concat([df, df.iloc[[3]]])
    with pytest.raises(ValueError, match="trial_42.*duplicated"):
        cl_metrics(df)


def test_missing_cell_raises_naming_trial() -> None:
    df = long_form(R3, list("ABC"), zero_shot=True, trial_id="trial_7")
    df = df[~((df["step"] == 2) & (df["eval_task"] == "C"))]
    with pytest.raises(ValueError, match="trial_7.*missing"):
        cl_metrics(df)
    gap = long_form(R3, list("ABC"), zero_shot=True, trial_id="trial_8")
    with pytest.raises(ValueError, match="trial_8.*missing"):
        cl_metrics(gap[gap["step"] != 2])


def test_cl_metrics_empty_input() -> None:
    out = cl_metrics(pd.DataFrame(columns=["trial_id", "step", "trained_task", "eval_task", "value"]))
    assert out.empty and "avg" in out.columns and "trial_id" in out.columns
