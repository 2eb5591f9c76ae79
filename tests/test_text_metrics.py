"""Text metrics: CIDEr-D against the COCO caption scorer itself, VQA accuracy cases."""

from __future__ import annotations

import math
import random
import shutil

import pytest

from mmcl.metrics_text import (
    caption_tokens, cider, cider_d, normalize_answer, ptb_tokenize, resolve_caption_tokenizer, score_text,
    vqa_accuracy, vqa_accuracy_one,
)  # fmt: skip

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH: the PTB tokenizer needs it")

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


def test_python_caption_tokens_lowercase_and_drop_punctuation():
    assert caption_tokens("A Dog's ball, on the GRASS.") == ["a", "dog", "'s", "ball", "on", "the", "grass"]
    # Punctuation does not change the score.
    refs = [["a red ring."], ["two blue squares!"]]
    assert cider(["A red ring", "two blue squares"], refs, "python") == pytest.approx(
        cider(["a red ring.", "two blue squares!"], refs, "python")
    )


# Captions where PTB and the pure-Python tokenizer disagree (hyphens, contractions,
# numbers, symbols, parentheses, non-ASCII letters), and plain ones where they agree.
HARD = [
    "A man in a t-shirt doesn't hold 2,000 coins.",
    "Two dogs (one brown) at 10:30 on a 3.5 m wall",
    "A café sign & a naïve cat's toy... \"quoted\"",
    "",
    "Kids play -- happily; yes!",
]
PLAIN = ["a dog sits on the grass", "two men ride red bikes", "the cat is on a table"]


@needs_java
def test_ptb_tokenize_equals_pycocoevalcap_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = HARD + PLAIN
    theirs = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    ours = ptb_tokenize(texts)
    assert [" ".join(t) for t in ours] == [theirs[i][0] for i in range(len(texts))]
    # The cases the Python tokenizer gets wrong really differ (else the test proves nothing)
    # and the plain ones agree.
    assert ours[0] == ["a", "man", "in", "a", "t-shirt", "does", "n't", "hold", "2,000", "coins"]
    assert "café" in ours[2] and "-lrb-" in ours[1]  # pycocoevalcap's upper-case list keeps -lrb-
    assert all(ours[len(HARD) + i] == caption_tokens(t) for i, t in enumerate(PLAIN))
    assert ours[3] == []


@needs_java
def test_cider_default_is_ptb_and_matches_pycocoevalcap_pipeline():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = [[HARD[0], "a man wears a t-shirt with 2,000 coins"], [HARD[1], "dogs by a wall at 10:30"],
            [HARD[2], "a sign at a café"], PLAIN[:2], PLAIN[1:]]  # fmt: skip
    cands = ["a man in a t-shirt doesn't hold 2,000 coins", "two dogs (one brown) by a wall", "a café sign",
             PLAIN[0], PLAIN[2]]  # fmt: skip
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": c}] for i, c in enumerate(cands)})
    official, _ = Cider().compute_score(gts, res)
    assert resolve_caption_tokenizer("auto") == "ptb"
    assert score_text("cider", cands, refs) == pytest.approx(100 * float(official), rel=1e-9)
    # The fallback scores these captions differently: which tokenizer ran matters.
    assert abs(score_text("cider", cands, refs, "python") - score_text("cider", cands, refs, "ptb")) > 1.0


def test_caption_tokenizer_without_java_falls_back_or_fails_clearly(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert resolve_caption_tokenizer("auto") == "python"
    with pytest.raises(RuntimeError, match="caption_tokenizer is 'ptb' but on this node no `java` is on PATH.*caption_tokenizer: python"):
        resolve_caption_tokenizer("ptb")
    with pytest.raises(ValueError, match="evaluation.caption_tokenizer: 'java' is not one of auto, ptb, python"):
        resolve_caption_tokenizer("java")


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
        # The official contraction table is looked up after lower-casing and is case-
        # sensitive: its capitalised keys never fire; "hes" / "whos" map; its reversed
        # entry maps "somebody'd" to "somebodyd".
        ("Ive", "ive"),
        ("Im", "im"),
        ("hes", "he's"),
        ("whos", "who's"),
        ("somebody'd", "somebodyd"),
        ("twas", "'twas"),
        # A punctuation mark next to a space is removed, else replaced by a space; a comma
        # between digits anywhere removes every mark without a space.
        ("left/right", "left right"),
        ("left / right", "left right"),
        ("red,blue 1,000", "redblue 1000"),
        # Periods not followed by a digit go, at most 32 of them.
        ("x" + "." * 40, "x" + "." * 8),
        ("x" + "." * 32, "x"),
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
    assert vqa_accuracy(["red", "blue"], [ten, ten]) == 0.5
    assert score_text("vqa_acc", ["red", "blue"], [ten, ten]) == 50.0
    assert math.isnan(vqa_accuracy([], []))
    with pytest.raises(ValueError, match="unknown text metric"):
        score_text("bleu", ["a"], [["a"]])


def test_vqa_normalises_only_when_humans_disagree():
    # Unanimous humans: the official script normalises neither side, so case, articles,
    # number words and punctuation all count.
    assert vqa_accuracy_one("Two", ["2"] * 10) == 0.0
    assert vqa_accuracy_one("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy_one("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy_one("dog", ["the dog"] * 10) == 0.0
    # ... except newlines / tabs and surrounding spaces, which are cleaned first; answers that
    # only differ by them are unanimous.
    assert vqa_accuracy_one("  yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy_one("yes.", ["yes"] * 5 + [" yes\t"] * 5) == 0.0
    # Humans who disagree: both sides normalised. "Two" == "2" for the 9 humans who said
    # "two" / "2" (every leave-one-out subset keeps >= 8 matches).
    assert vqa_accuracy_one("Two", ["2"] * 5 + ["two"] * 4 + ["3"]) == 1.0
    assert vqa_accuracy_one("dog", ["the dog"] * 9 + ["cat"]) == 1.0
    # One matching human among disagreeing ones: 9 subsets see it once (1/3), one does not.
    assert vqa_accuracy_one("yes.", ["Yes"] + ["no"] * 9) == pytest.approx(9 * (1 / 3) / 10)
