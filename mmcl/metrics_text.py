"""Scores of generated text: CIDEr-D (captioning) and VQA accuracy (open-ended VQA).

The engine scores a task's generated strings with the task's ``metric`` through
:func:`score_text`, which returns one number in percent-like units so that the accuracy
matrix, analysis/, ASHA and reports treat every track alike:

- ``cider``: CIDEr-D x 100, the way captioning papers report it (ECA's ToS-COCO 125.56 is
  1.2556 in the scorer's own units). Vedantam, Zitnick, Parikh, "CIDEr: Consensus-based
  Image Description Evaluation", CVPR 2015; the "-D" variant (clipping, Gaussian length
  penalty) is what the COCO caption evaluation code (pycocoevalcap ``Cider``) computes.
- ``vqa_acc``: VQA accuracy in percent. Antol et al., "VQA: Visual Question Answering",
  ICCV 2015; Goyal et al. (VQAv2), CVPR 2017; the official evaluation script.

CIDEr-D here reproduces pycocoevalcap's ``CiderScorer`` exactly (a test compares them on
the same pre-tokenised input): n-grams 1..4, TF-IDF vectors whose document frequencies
come from the references of the evaluated set itself, cosine similarity with clipped
candidate counts (``min(hyp, ref) * ref``), a Gaussian penalty ``exp(-delta^2 / (2 * 6^2))``
on the length difference, averaged over n and over references, times 10. Like the
reference code, the "length" in the penalty counts the sentence's bigrams (its
``n == 1`` index is the bigram order); we keep that so numbers stay comparable.

Tokenisation (:func:`caption_tokens`): pycocoevalcap runs the Stanford PTB tokenizer in
Java before scoring. We do not need Java: text is lower-cased, split into runs of letters
and digits, with an apostrophe suffix kept as its own token ("dog's" -> "dog 's") as PTB
does, and every other punctuation mark dropped (PTB's output has the same marks removed
by pycocoevalcap). Differences remain for rare cases ("don't": PTB "do n't", ours
"don 't"); both sides of a comparison always use the same tokeniser.

VQA accuracy: an answer's accuracy is min(#humans who gave it / 3, 1), averaged over the
10 leave-one-out subsets of the 10 human answers (the official script). Answers are
normalised first (:func:`normalize_answer`): newlines and tabs to spaces, punctuation
removed or replaced as the official script does, lower case, number words to digits,
articles dropped, contractions restored ("dont" -> "don't"). The official script
normalises the human answers only when they disagree; we normalise them always (as LAVIS
does), which can only change a score when identical answers differ from their normal
form.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

TEXT_METRICS = ("cider", "vqa_acc")

# --------------------------------------------------------------------------- tokenisation

_TOKEN = re.compile(r"[a-z0-9]+|'[a-z]+")


def caption_tokens(text: str) -> list[str]:
    """The project's caption tokenisation (see the module docstring)."""
    return _TOKEN.findall(text.lower())


# --------------------------------------------------------------------------- CIDEr-D

_N = 4
_SIGMA = 6.0


def _ngrams(words: Sequence[str], n: int = _N) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _vector(counts: Counter, df: dict, log_n_docs: float) -> tuple[list[dict], list[float], int]:
    vec: list[dict] = [defaultdict(float) for _ in range(_N)]
    norm = [0.0] * _N
    length = 0
    for gram, tf in counts.items():
        order = len(gram) - 1
        weight = tf * (log_n_docs - math.log(max(1.0, df.get(gram, 0.0))))
        vec[order][gram] = weight
        norm[order] += weight * weight
        if order == 1:  # the reference implementation's "length": bigram count
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _sim(hyp, ref) -> list[float]:
    vh, nh, lh = hyp
    vr, nr, lr = ref
    delta = float(lh - lr)
    out = []
    for k in range(_N):
        val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
        if nh[k] != 0 and nr[k] != 0:
            val /= nh[k] * nr[k]
        out.append(val * math.exp(-(delta**2) / (2 * _SIGMA**2)))
    return out


def cider_d(
    candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised candidates against tokenised references, in the scorer's own
    units (not x100): returns (corpus mean, per-candidate scores)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if not candidates:
        return float("nan"), []
    refs_counts = [[_ngrams(r) for r in refs] for refs in references]
    df: dict = defaultdict(float)
    for refs in refs_counts:
        for gram in {g for r in refs for g in r}:
            df[gram] += 1
    log_n = math.log(float(len(candidates)))
    scores = []
    for cand, refs in zip(candidates, refs_counts):
        if not refs:
            raise ValueError("every candidate needs at least one reference")
        hyp = _vector(_ngrams(cand), df, log_n)
        total = [0.0] * _N
        for r in refs:
            for k, v in enumerate(_sim(hyp, _vector(r, df, log_n))):
                total[k] += v
        scores.append(sum(total) / _N / len(refs) * 10.0)
    return sum(scores) / len(scores), scores


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D of raw strings, tokenised with :func:`caption_tokens` (scorer units)."""
    return cider_d([caption_tokens(c) for c in candidates], [[caption_tokens(r) for r in rs] for rs in references])[0]


# --------------------------------------------------------------------------- VQA accuracy

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# Copied from the official script, including its look-behind typo ("(?!<=" is a
# look-ahead): a period not followed by a digit is removed.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The official table maps apostrophe-less spellings to the canonical contraction; it is
# generated here from the canonical forms (every way of dropping apostrophes).
_CANONICAL_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't "
    "would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for canon in _CANONICAL_CONTRACTIONS:
        parts = canon.split("'")
        gaps = len(parts) - 1
        for mask in range(2**gaps - 1):  # every subset of apostrophes kept, except all
            out = parts[0]
            for i in range(gaps):
                out += ("'" if mask >> i & 1 else "") + parts[i + 1]
            # "id", "im", "its", "well", "were", "wed" ... are words: the official table
            # does not map those spellings either.
            if out not in {"id", "im", "its", "well", "were", "wed", "hell", "shell", "ill", "lets", "hes", "whos"}:
                table.setdefault(out, canon)
    return table


_CONTRACTIONS = _contractions()


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation (see the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy_one(answer: str, human_answers: Sequence[str]) -> float:
    """Soft accuracy in [0, 1] of one answer against its human answers (usually 10)."""
    if not human_answers:
        raise ValueError("a question needs at least one human answer")
    ans = normalize_answer(answer)
    gts = [normalize_answer(a) for a in human_answers]
    if len(gts) == 1:
        return float(gts[0] == ans)
    accs = []
    for i in range(len(gts)):  # leave human i out, count matches among the others
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == ans)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def vqa_accuracy(answers: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """Mean soft accuracy (in [0, 1]) over questions."""
    if len(answers) != len(human_answers):
        raise ValueError(f"{len(answers)} answers but {len(human_answers)} answer sets")
    if not answers:
        return float("nan")
    return sum(vqa_accuracy_one(a, h) for a, h in zip(answers, human_answers)) / len(answers)


# --------------------------------------------------------------------------- dispatch


def score_text(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """A task's score in the accuracy matrix's units: CIDEr-D x 100, or VQA accuracy in %."""
    if metric == "cider":
        return 100.0 * cider(predictions, references)
    if metric == "vqa_acc":
        return 100.0 * vqa_accuracy(predictions, references)
    raise ValueError(f"unknown text metric {metric!r}; known: {', '.join(TEXT_METRICS)}")


__all__ = [
    "TEXT_METRICS", "caption_tokens", "cider", "cider_d", "normalize_answer", "score_text",
    "vqa_accuracy", "vqa_accuracy_one",
]  # fmt: skip
