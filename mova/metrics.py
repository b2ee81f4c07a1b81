"""Benchmark metrics as the community's evaluation kits define them, in pure Python.

VQA accuracy (VQAv2, TextVQA), ANLS (DocVQA), relaxed accuracy (ChartQA), exact match (GQA),
POPE precision/recall/F1 and the MME per-category score. Per-sample scorers share the
signature ``(prediction, references) -> float`` so a benchmark can name its metric in a recipe.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "METRICS",
    "MME_COGNITION",
    "MME_PERCEPTION",
    "aggregate",
    "anls",
    "edit_distance",
    "exact_match",
    "mme_scores",
    "normalize_vqa_answer",
    "pope_scores",
    "relaxed_accuracy",
    "score",
    "vqa_accuracy",
    "yes_no",
]

# ---------------------------------------------------------------------------------------------
# VQA answer normalisation
# ---------------------------------------------------------------------------------------------

# Marks handled by the context rule (periods and apostrophes are treated separately: periods
# by the digit rule, apostrophes are kept so contractions survive).
_PUNCTUATION = frozenset(';/[]"{}()=+\\_-><@`,?!')
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spellings -> canonical contraction. Words that are also ordinary English
# words (its, ill, wed, well, were, lets, shed, hell, shell) are left out on purpose.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldntve": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "im": "i'm",
    "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "maam": "ma'am",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "oclock": "o'clock", "shant": "shan't", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "werent": "weren't", "weve": "we've", "whats": "what's",
    "whatre": "what're", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyre": "why're",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all",
    "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    """Remove a mark that touches whitespace or an end; a mark inside a word becomes a space."""
    out = []
    for i, ch in enumerate(text):
        if ch not in _PUNCTUATION:
            out.append(ch)
            continue
        before = text[i - 1] if i > 0 else " "
        after = text[i + 1] if i + 1 < len(text) else " "
        if not (before.isspace() or after.isspace()):
            out.append(" ")  # "black/white" -> "black white"
    return "".join(out)


def normalize_vqa_answer(text: str) -> str:
    """Canonical form of a VQA answer, so that "Two dogs." and "2 dogs" compare equal.

    Steps: newlines/tabs to spaces, strip, lower-case; commas inside numbers removed
    ("1,000" -> "1000"); periods removed unless between two digits ("3.5" stays); other
    punctuation removed next to whitespace and replaced by a space inside a word; number words
    to digits (none..ten); articles dropped; apostrophe-less contractions fixed ("dont").
    """
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _DIGIT_COMMA.sub("", text)
    text = _LONE_PERIOD.sub("", text)
    text = _strip_punctuation(text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _as_references(references: str | Sequence[str], metric: str) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError(f"{metric}: references is empty; expected at least one reference")
    return refs


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQAv2/TextVQA accuracy: mean over leave-one-out reference subsets of min(1, matches/3).

    With n >= 2 references, subset i holds every reference but the i-th. With a single
    reference there is no non-empty subset, so the score is the exact normalised match (0 or 1).
    """
    refs = [normalize_vqa_answer(r) for r in _as_references(references, "vqa_accuracy")]
    pred = normalize_vqa_answer(prediction)
    hits = [r == pred for r in refs]
    if len(refs) == 1:
        return float(hits[0])
    total = sum(hits)
    # min(1, m/3) == min(3, m)/3; summing integers first keeps e.g. 0.6 exact.
    return sum(min(3, total - int(h)) for h in hits) / (3 * len(refs))


# ---------------------------------------------------------------------------------------------
# ANLS, relaxed accuracy, exact match
# ---------------------------------------------------------------------------------------------


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insert, delete, substitute)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA ANLS for one question: max over references of 1 - edit_distance / max(len).

    Text is lower-cased, stripped and inner whitespace collapsed. As in the official DocVQA
    rule (normalised distance must be < tau), a similarity at or below ``threshold`` gives 0;
    with the default 0.5 a similarity of exactly 0.5 scores 0.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"anls: threshold={threshold!r}; expected a value in [0, 1]")
    pred = _anls_text(prediction)
    best = 0.0
    for ref in _as_references(references, "anls"):
        ref = _anls_text(ref)
        longest = max(len(pred), len(ref))
        distance = edit_distance(pred, ref) / longest if longest else 0.0
        if distance < 1.0 - threshold:
            best = max(best, 1.0 - distance)
    return best


_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _parse_number(text: str) -> float | None:
    """A float from "12", "-3.5", "1,234.5", "12%" (percent sign dropped, value kept), or None."""
    text = text.strip()
    if text.endswith("%"):
        text = text[:-1].rstrip()
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text.replace(",", ""))
    return value if math.isfinite(value) else None


def relaxed_accuracy(
    prediction: str, reference: str | Sequence[str], tolerance: float = 0.05
) -> float:
    """ChartQA relaxed accuracy: numbers within ``tolerance`` relative error, else exact text.

    A trailing "%" is dropped on both sides without rescaling, so "12%" matches "12". A zero
    reference needs an exactly zero prediction. Non-numbers compare case-insensitively after
    stripping. With several references the best one counts.
    """
    if tolerance < 0:
        raise ValueError(f"relaxed_accuracy: tolerance={tolerance!r}; expected >= 0")
    pred_text = prediction.strip().lower()
    pred_num = _parse_number(prediction)
    for ref in _as_references(reference, "relaxed_accuracy"):
        ref_num = _parse_number(ref)
        if pred_num is not None and ref_num is not None:
            if ref_num == 0:
                correct = pred_num == 0
            else:
                correct = abs(pred_num - ref_num) / abs(ref_num) <= tolerance
        else:
            correct = pred_text == ref.strip().lower()
        if correct:
            return 1.0
    return 0.0


def _em_text(text: str) -> str:
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, reference: str | Sequence[str]) -> float:
    """GQA exact match: case-insensitive after stripping and dropping one trailing period."""
    pred = _em_text(prediction)
    return float(any(pred == _em_text(r) for r in _as_references(reference, "exact_match")))


# ---------------------------------------------------------------------------------------------
# POPE and MME (yes/no benchmarks)
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_NEGATIONS = frozenset({"no", "not"})


def yes_no(text: str) -> str | None:
    """Map a free answer to "yes"/"no", or None when it says neither.

    Rule: a first word "yes"/"no" decides; otherwise any negation ("no", "not", or a word
    ending in "n't") gives "no"; otherwise a "yes" anywhere gives "yes"; otherwise None.
    """
    words = _WORD.findall(text.lower().replace("\u2019", "'"))
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    if any(w in _NEGATIONS or w.endswith("n't") for w in words):
        return "no"
    return "yes" if "yes" in words else None


def _label(value: object, where: str) -> str:
    label = str(value).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"{where}: label={value!r}; expected 'yes' or 'no'")
    return label


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 ("yes" is positive) and yes ratio, all in [0, 1].

    Predictions go through :func:`yes_no`; an unparsable prediction counts as "no". The
    counts (tp, fp, tn, fn, unparsable) are returned as well.
    """
    if len(predictions) != len(labels):
        raise ValueError(
            f"pope_scores: {len(predictions)} predictions but {len(labels)} labels; "
            "expected equal lengths"
        )
    if not labels:
        raise ValueError("pope_scores: no predictions; expected at least one")
    tp = fp = tn = fn = unparsable = 0
    for i, (pred_text, raw_label) in enumerate(zip(predictions, labels, strict=True)):
        label = _label(raw_label, f"pope_scores labels[{i}]")
        pred = yes_no(pred_text)
        if pred is None:
            unparsable += 1
            pred = "no"
        if pred == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unparsable": unparsable,
    }


MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip
_MME_GROUPS = {"perception": MME_PERCEPTION, "cognition": MME_COGNITION}
_MME_KEYS = ("category", "image_id", "prediction", "label")


def mme_scores(records: Sequence[Mapping]) -> dict[str, dict]:
    """MME score per category: acc (% questions right) + acc_plus (% images all right).

    Each category gets {"acc", "acc_plus", "score", "questions", "images"} (score max 200).
    "perception" and "cognition" hold the summed scores of the standard categories present
    (matched case-insensitively) and how many there were; unknown categories are reported but
    counted in neither. An unparsable prediction (see :func:`yes_no`) is simply wrong.
    """
    if not records:
        raise ValueError("mme_scores: no records; expected at least one")
    # category -> image_id -> list of per-question correctness
    by_category: dict[str, dict[object, list[bool]]] = {}
    for i, record in enumerate(records):
        missing = [k for k in _MME_KEYS if k not in record]
        if missing:
            raise ValueError(f"mme_scores: records[{i}] lacks {missing}; expected {_MME_KEYS}")
        category = str(record["category"])
        if category.lower() in _MME_GROUPS:
            raise ValueError(
                f"mme_scores: records[{i}] category={category!r} clashes with a group total"
            )
        label = _label(record["label"], f"mme_scores records[{i}]")
        correct = yes_no(str(record["prediction"])) == label
        by_category.setdefault(category, {}).setdefault(record["image_id"], []).append(correct)

    results: dict[str, dict] = {}
    for category, images in by_category.items():
        answers = [c for per_image in images.values() for c in per_image]
        acc = 100.0 * sum(answers) / len(answers)
        acc_plus = 100.0 * sum(all(v) for v in images.values()) / len(images)
        results[category] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": acc + acc_plus,
            "questions": len(answers),
            "images": len(images),
        }
    for group, members in _MME_GROUPS.items():
        wanted = {m.lower() for m in members}
        present = [c for c in by_category if c.lower() in wanted]
        results[group] = {
            "score": sum(results[c]["score"] for c in present),
            "categories": len(present),
        }
    return results


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "exact_match": exact_match,
}


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    """Score one sample with the per-sample metric registered under ``metric``."""
    try:
        scorer = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}") from None
    return scorer(prediction, references)


def aggregate(scores: Sequence[float]) -> float:
    """Mean of per-sample scores; 0.0 for an empty list (nothing evaluated)."""
    return math.fsum(scores) / len(scores) if scores else 0.0
