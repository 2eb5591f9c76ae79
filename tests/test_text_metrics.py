"""Text metrics: CIDEr-D against the COCO caption scorer itself, VQA accuracy cases."""

from __future__ import annotations

import math
import random

import pytest

from mmcl.metrics_text import caption_tokens, cider, cider_d, normalize_answer, score_text, vqa_accuracy, vqa_accuracy_one

WORDS = "a an the man woman dog cat red blue sits on under table grass ball plays with two small big".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))


def _corpus(seed: int, n: int = 40):
    rng = random.Random(seed)
    refs = {i: [_sentence(rng) for _ in range(rng.randint(1, 5))] for i in range(n)}
    # Candidates: some copy a reference (high score), some are random (low), some empty-ish.
    res = {}
    for i in range(n):
        r = rng.random()
        res[i] = [refs[i][0] if r < 0.3 else (rng.choice(WORDS) if r < 0.4 else _sentence(rng))]
    return refs, res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_matches_pycocoevalcap(seed):
    from pycocoevalcap.cider.cider import Cider

    refs, res = _corpus(seed)
    ref_score, ref_scores = Cider().compute_score(refs, res)
    ids = list(refs)
    ours, per = cider_d([res[i][0].split() for i in ids], [[r.split() for r in refs[i]] for i in ids])
    assert ours == pytest.approx(float(ref_score), rel=1e-9, abs=1e-12)
    assert per == pytest.approx([float(x) for x in ref_scores], rel=1e-9, abs=1e-12)
    assert ours > 0.1  # the copied references score: the comparison is not trivially 0 == 0


def test_cider_exact_copies_beat_paraphrases_and_scale_is_x100():
    refs = [["a red ring on a striped background", "a photo of a red ring"], ["two blue squares", "blue squares on grass"],
            ["a cat sits on the table", "the cat on a table"]]  # fmt: skip
    exact = [r[0] for r in refs]
    worse = ["a ring", "squares", "a dog under the table"]
    assert cider(exact, refs) > cider(worse, refs) > 0
    assert score_text("cider", exact, refs) == pytest.approx(100 * cider(exact, refs))


def test_caption_tokens_lowercase_and_drop_punctuation():
    assert caption_tokens("A Dog's ball, on the GRASS.") == ["a", "dog", "'s", "ball", "on", "the", "grass"]
    # Punctuation does not change the score.
    refs = [["a red ring."], ["two blue squares!"]]
    assert cider(["A red ring", "two blue squares"], refs) == pytest.approx(cider(["a red ring.", "two blue squares!"], refs))


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Two", "2"),
        ("the dog", "dog"),
        ("a red ball.", "red ball"),
        ("yes!", "yes"),
        ("dont", "don't"),
        ("3.5", "3.5"),
        ("black-and-white", "black and white"),
        ("1,000", "1000"),
        ("  none\n", "0"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_soft_accuracy_cases():
    ten = ["red"] * 10
    assert vqa_accuracy_one("red", ten) == 1.0
    assert vqa_accuracy_one("blue", ten) == 0.0
    # 2 of 10 humans: leave-one-out counts are 1 (2 subsets) or 2 (8 subsets) -> (2*1/3 + 8*2/3) / 10.
    two = ["blue"] * 2 + ["red"] * 8
    assert vqa_accuracy_one("blue", two) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    # 3 of 10: 3 subsets see 2 matches (2/3), 7 see 3 (1.0).
    three = ["blue"] * 3 + ["red"] * 7
    assert vqa_accuracy_one("blue", three) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    # 4 or more agreeing humans: full credit.
    assert vqa_accuracy_one("blue", ["blue"] * 4 + ["red"] * 6) == 1.0
    # Normalisation applies to both sides: "Two" == "2", "the dog" == "dog".
    assert vqa_accuracy_one("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy_one("dog", ["the dog"] * 10) == 1.0
    assert vqa_accuracy(["red", "blue"], [ten, ten]) == 0.5
    assert score_text("vqa_acc", ["red", "blue"], [ten, ten]) == 50.0
    assert math.isnan(vqa_accuracy([], []))
    with pytest.raises(ValueError, match="unknown text metric"):
        score_text("bleu", ["a"], [["a"]])
