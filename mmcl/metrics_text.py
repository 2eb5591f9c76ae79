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

Tokenisation: pycocoevalcap runs the Stanford PTB tokenizer (Java, the CoreNLP 3.4.1 jar
it ships, lower-cased, one line per caption) and then drops the punctuation tokens of its
list. :func:`ptb_tokenize` does exactly that in one Java call for all strings of a scored
task (candidates and references); it is the default (``evaluation.caption_tokenizer:
auto`` picks it where ``java`` is on PATH). Its quirks are kept: parentheses become
``-lrb-`` / ``-rrb-`` tokens that stay (the removal list is upper-case), "t-shirt" and
"2,000" stay one token, "doesn't" is "does n't". Without Java, :func:`caption_tokens` is
the fallback: lower case, runs of letters and digits, an apostrophe suffix as its own
token, other punctuation dropped; equal to PTB on plain captions, not on the cases above
(on captions with such tokens, CIDEr moves by tens of points x100), so the trials table
records which tokenizer ran.

VQA accuracy: the official script (GT-Vision-Lab/VQA ``vqaEval.py``), case for case. An
answer's accuracy is min(#humans who gave it / 3, 1), averaged over the 10 leave-one-out
subsets of the 10 human answers. Newlines and tabs become spaces and both sides are
stripped; then, *only when the human answers disagree*, the answer and every human answer
are normalised (:func:`normalize_answer`: punctuation removed or replaced, at most 32
periods stripped, lower case, number words to digits, articles dropped, the official
contraction table looked up case-sensitively). Unanimous humans are compared verbatim:
"Yes" or "yes." against ten "yes" scores 0, as in the official results.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

TEXT_METRICS = ("cider", "vqa_acc")

# --------------------------------------------------------------------------- tokenisation

_TOKEN = re.compile(r"[a-z0-9]+|'[a-z]+")
CAPTION_TOKENIZERS = ("auto", "ptb", "python")
# pycocoevalcap's removal list after PTB tokenisation (facts of its ptbtokenizer.py).
_PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"])  # fmt: skip
# One Java start plus tokenising a task's captions takes ~0.3 s; a bound, so a stuck JVM
# fails the evaluation with a message instead of hanging the trial.
_PTB_TIMEOUT_S = 300


def caption_tokens(text: str) -> list[str]:
    """The pure-Python caption tokenisation, the fallback without Java (module docstring)."""
    return _TOKEN.findall(text.lower())


def _ptb_jar() -> str | None:
    """The CoreNLP jar pycocoevalcap ships, or None without pycocoevalcap."""
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        return None
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    return str(jar) if jar.is_file() else None


def resolve_caption_tokenizer(mode: str = "auto") -> str:
    """``ptb`` or ``python``: what ``mode`` means on this machine."""
    if mode not in CAPTION_TOKENIZERS:
        raise ValueError(f"evaluation.caption_tokenizer: {mode!r} is not one of {', '.join(CAPTION_TOKENIZERS)}")
    missing = []
    if not shutil.which("java"):
        missing.append("no `java` is on PATH (install a Java runtime, Debian: apt-get install default-jre-headless)")
    if _ptb_jar() is None:
        missing.append("pycocoevalcap's tokenizer jar is not installed (`uv sync`, or pip install pycocoevalcap)")
    if mode == "auto":
        return "python" if missing else "ptb"
    if mode == "ptb" and missing:
        raise RuntimeError(
            f"evaluation.caption_tokenizer is 'ptb' but on this node {'; '.join(missing)}; fix that or set "
            "evaluation.caption_tokenizer: python"
        )
    return mode


def ptb_tokenize(texts: Sequence[str]) -> list[list[str]]:
    """pycocoevalcap's tokenisation of every string, in one Java call: the Stanford PTB
    tokenizer (``-preserveLines -lowerCase``) then its punctuation tokens removed."""
    if not texts:
        return []
    with tempfile.TemporaryDirectory(prefix="mmcl-ptb-") as tmp:
        # A file in our own temp dir (pycocoevalcap writes into its package dir, which is
        # read-only on some cluster images); UTF-8 both ways whatever the node's locale.
        src = Path(tmp) / "captions.txt"
        src.write_text("\n".join(t.replace("\n", " ").replace("\r", " ") for t in texts), encoding="utf-8")
        jar = _ptb_jar()
        if jar is None:
            raise RuntimeError("the PTB tokenizer needs pycocoevalcap's jar: `uv sync` (or pip install pycocoevalcap)")
        cmd = ["java", "-Dfile.encoding=UTF-8", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", "-encoding", "utf-8", str(src)]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=_PTB_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"the PTB tokenizer (java) did not finish {len(texts)} captions in {_PTB_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer (java) failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "" and len(lines) == len(texts) + 1:
        lines = lines[:-1]  # a trailing newline after the last caption
    if len(lines) != len(texts):
        raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(texts)} captions")
    return [[w for w in line.rstrip().split(" ") if w and w not in _PTB_PUNCTUATION] for line in lines]


def tokenize_captions(texts: Sequence[str], tokenizer: str = "auto") -> list[list[str]]:
    """Tokens of every string with the resolved tokenizer (see :func:`resolve_caption_tokenizer`)."""
    if resolve_caption_tokenizer(tokenizer) == "ptb":
        return ptb_tokenize(texts)
    return [caption_tokens(t) for t in texts]


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


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str = "auto") -> float:
    """Corpus CIDEr-D of raw strings (scorer units); candidates and references are
    tokenised together, one Java call with the PTB tokenizer."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    flat = list(candidates) + [r for rs in references for r in rs]
    toks = tokenize_captions(flat, tokenizer)
    cands, refs, i = toks[: len(candidates)], [], len(candidates)
    for rs in references:
        refs.append(toks[i : i + len(rs)])
        i += len(rs)
    return cider_d(cands, refs)[0]


# --------------------------------------------------------------------------- VQA accuracy

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern, including its look-behind typo ("(?!<=" is a look-ahead, always
# true before a period): a period not followed by a digit is removed.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official script passes ``re.UNICODE`` (32) where ``re.sub``'s third positional
# argument is ``count``: it removes at most 32 such periods. Kept, so "a...." answers with
# long runs of periods score as there.
_PERIOD_STRIP_COUNT = 32
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The official contraction table, as data: each line is "replacement: spelling ...". It is
# looked up word by word, case-sensitively, after the words were lower-cased, so the
# capitalised spellings ("Im", "Ive", "Id've", "I'dve") never fire; "hes" and "whos" do map;
# "somebody'd" maps to "somebodyd" (the table's own reversed entry). Identity entries
# ("let's", "she's") are omitted: they change nothing.
_CONTRACTION_TABLE = """
ain't: aint | aren't: arent | can't: cant | could've: couldve | couldn't: couldnt
couldn't've: couldn'tve couldnt've | didn't: didnt | doesn't: doesnt | don't: dont | hadn't: hadnt
hadn't've: hadnt've hadn'tve | hasn't: hasnt | haven't: havent | he'd: hed | he'd've: hed've he'dve
he's: hes | how'd: howd | how'll: howll | how's: hows | I'd've: Id've I'dve | I'm: Im | I've: Ive
isn't: isnt | it'd: itd | it'd've: itd've it'dve | it'll: itll | ma'am: maam | mightn't: mightnt
mightn't've: mightnt've mightn'tve | might've: mightve | mustn't: mustnt | must've: mustve
needn't: neednt | not've: notve | o'clock: oclock | oughtn't: oughtnt
'ow's'at: ow's'at 'ows'at 'ow'sat | shan't: shant | she'd've: shed've she'dve | should've: shouldve
shouldn't: shouldnt | shouldn't've: shouldnt've shouldn'tve | somebodyd: somebody'd
somebody'd've: somebodyd've somebody'dve | somebody'll: somebodyll | somebody's: somebodys
someone'd: someoned | someone'd've: someoned've someone'dve | someone'll: someonell
someone's: someones | something'd: somethingd | something'd've: somethingd've something'dve
something'll: somethingll | that's: thats | there'd: thered | there'd've: thered've there'dve
there're: therere | there's: theres | they'd: theyd | they'd've: theyd've they'dve | they'll: theyll
they're: theyre | they've: theyve | 'twas: twas | wasn't: wasnt | we'd've: wed've we'dve
we've: weve | weren't: werent | what'll: whatll | what're: whatre | what's: whats | what've: whatve
when's: whens | where'd: whered | where's: wheres | where've: whereve | who'd: whod
who'd've: whod've who'dve | who'll: wholl | who's: whos | who've: whove | why'll: whyll
why're: whyre | why's: whys | won't: wont | would've: wouldve | wouldn't: wouldnt
wouldn't've: wouldnt've wouldn'tve | y'all: yall | y'all'll: yall'll y'allll
y'all'd've: yall'd've y'alld've y'all'dve | you'd: youd | you'd've: youd've you'dve
you'll: youll | you're: youre | you've: youve
"""


def _contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for entry in _CONTRACTION_TABLE.replace("\n", " | ").split("|"):
        if entry.strip():
            target, spellings = entry.split(": ")
            table.update({s: target.strip() for s in spellings.split()})
    return table


_CONTRACTIONS = _contractions()


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # The test looks at the *input* text, not the partly processed one (as the script).
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation: whitespace, punctuation, lower case, number
    words to digits, articles dropped, contractions restored (see the module docstring)."""
    return _process_digit_article(_process_punctuation(_clean_whitespace(answer)))


def vqa_accuracy_one(answer: str, human_answers: Sequence[str]) -> float:
    """Soft accuracy in [0, 1] of one answer against its human answers (usually 10), as the
    official script scores it (including when it normalises: see the module docstring)."""
    if not human_answers:
        raise ValueError("a question needs at least one human answer")
    ans = _clean_whitespace(answer)
    gts = [_clean_whitespace(a) for a in human_answers]
    if len(set(gts)) > 1:
        # Only a question whose humans disagree is normalised, both sides (the official
        # script). Unanimous humans are compared verbatim: "Yes" against ten "yes" is 0.
        ans, gts = normalize_answer(ans), [normalize_answer(g) for g in gts]
    if len(gts) == 1:
        # [choice] Outside the official script's domain (VQA has 10 answers; with one, its
        # leave-one-out always scores 0): a single reference is an exact-match test.
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


def score_text(
    metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]], caption_tokenizer: str = "auto"
) -> float:
    """A task's score in the accuracy matrix's units: CIDEr-D x 100, or VQA accuracy in %."""
    if metric == "cider":
        return 100.0 * cider(predictions, references, caption_tokenizer)
    if metric == "vqa_acc":
        return 100.0 * vqa_accuracy(predictions, references)
    raise ValueError(f"unknown text metric {metric!r}; known: {', '.join(TEXT_METRICS)}")


__all__ = [
    "CAPTION_TOKENIZERS", "TEXT_METRICS", "caption_tokens", "cider", "cider_d", "normalize_answer", "ptb_tokenize",
    "resolve_caption_tokenizer", "score_text", "tokenize_captions", "vqa_accuracy", "vqa_accuracy_one",
]  # fmt: skip
