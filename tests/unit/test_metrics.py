"""Hand-computed checks of the benchmark metrics in mova.metrics."""

from __future__ import annotations

import pytest

from mova import metrics
from mova.metrics import (
    METRICS,
    aggregate,
    anls,
    edit_distance,
    exact_match,
    mme_scores,
    normalize_vqa_answer,
    pope_scores,
    relaxed_accuracy,
    score,
    vqa_accuracy,
    yes_no,
)

# --------------------------------------------------------------------------- VQA normaliser


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),
        ("the cat", "cat"),
        ("1,000", "1000"),
        ("1,000,000", "1000000"),
        ("dont", "don't"),
        ("don't", "don't"),
        ("Whats that", "what's that"),
        ("Theyre", "they're"),
        ("yes!", "yes"),
        ("hello?!", "hello"),
        ("  A\tDog\n", "dog"),
        ("It is an apple", "it is apple"),
        ("3.5", "3.5"),
        ("3.", "3"),
        ("u.s.a.", "usa"),
        ("black/white", "black white"),
        ("t-shirt", "t shirt"),
        ("red, blue", "red blue"),
        ("(left)", "left"),
        ("None", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("line one\nline two", "line 1 line 2"),
        ("", ""),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_contraction_table_is_large_and_well_formed() -> None:
    table = metrics._CONTRACTIONS
    assert len(table) >= 30
    for bare, fixed in table.items():
        assert "'" not in bare and fixed.replace("'", "") == bare


# --------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # k of 10 references match. The k matching subsets see k-1 matches, the other 10-k
        # subsets see k; each subset scores min(3, m)/3, averaged over 10.
        (0, 0.0),
        (1, 0.3),  # (1*0 + 9*1) / 30
        (2, 0.6),  # (2*1 + 8*2) / 30
        (3, 0.9),  # (3*2 + 7*3) / 30
        (4, 1.0),  # (4*3 + 6*3) / 30
        (10, 1.0),
    ],
)
def test_vqa_accuracy_ten_references(matches: int, expected: float) -> None:
    refs = ["two"] * matches + ["cat"] * (10 - matches)
    assert vqa_accuracy("2", refs) == expected


def test_vqa_accuracy_three_references_one_match() -> None:
    # subsets: {b, c} -> 0, {a, c} -> 1/3, {a, b} -> 1/3; mean = 2/9
    assert vqa_accuracy("A dog", ["dog", "cat", "bird"]) == pytest.approx(2 / 9, abs=1e-12)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [("Two.", "2", 1.0), ("the Dog", "dog", 1.0), ("3", "2", 0.0)],
)
def test_vqa_accuracy_single_reference_is_exact_normalised_match(
    prediction: str, reference: str, expected: float
) -> None:
    assert vqa_accuracy(prediction, [reference]) == expected


def test_vqa_accuracy_rejects_no_references() -> None:
    with pytest.raises(ValueError, match="references"):
        vqa_accuracy("yes", [])


# --------------------------------------------------------------------------- ANLS


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "abc", 0)],
)
def test_edit_distance(a: str, b: str, distance: int) -> None:
    assert edit_distance(a, b) == distance
    assert edit_distance(b, a) == distance


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("sitting", ["kitten"], 4 / 7),  # distance 3 over length 7
        ("  HELLO World ", ["hello   world"], 1.0),  # case and whitespace ignored
        ("abxye", ["abcde"], 0.6),  # distance 2 / 5
        ("abxy", ["abcd"], 0.0),  # similarity exactly 0.5 -> cut to 0 (official NL < 0.5)
        ("abc", ["xyz"], 0.0),
        ("sitting", ["xyz", "kitten", "sitting"], 1.0),  # best reference wins
        ("", [""], 1.0),
    ],
)
def test_anls(prediction: str, references: list[str], expected: float) -> None:
    assert anls(prediction, references) == pytest.approx(expected, abs=1e-12)


def test_anls_threshold_is_configurable() -> None:
    # similarity 4/7 ~ 0.571: kept at threshold 0.5, cut at threshold 0.6
    assert anls("sitting", ["kitten"], threshold=0.6) == 0.0
    assert anls("sitting", ["kitten"], threshold=0.0) == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match="threshold"):
        anls("a", ["a"], threshold=1.5)


# --------------------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("104.9", "100", 1.0),  # 4.9% error
        ("105.1", "100", 0.0),  # 5.1% error
        ("95.1", "100", 1.0),
        ("94.9", "100", 0.0),
        ("-104", "-100", 1.0),
        ("12%", "12", 1.0),
        ("12", "12 %", 1.0),
        ("1,000", "1000", 1.0),
        (" 1,020.5 ", "1000", 1.0),
        ("0", "0", 1.0),
        ("0.0", "0", 1.0),  # zero reference: numeric equality
        ("0.01", "0", 0.0),
        (" Yes ", "yes", 1.0),  # non-numeric: case-insensitive exact
        ("blue", "Blue bar", 0.0),
        ("1,5", "15", 0.0),  # not a thousands separator -> compared as text
        ("e5", "e5", 1.0),
        ("2017", ["1990", "2017"], 1.0),  # best of several references
    ],
)
def test_relaxed_accuracy(prediction: str, reference: str | list[str], expected: float) -> None:
    assert relaxed_accuracy(prediction, reference) == expected


def test_relaxed_accuracy_tolerance() -> None:
    assert relaxed_accuracy("110", "100", tolerance=0.1) == 1.0
    assert relaxed_accuracy("110", "100", tolerance=0.05) == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        relaxed_accuracy("1", "1", tolerance=-0.1)


# --------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Yes.", "yes", 1.0),
        ("  Red ", "red.", 1.0),
        ("red car", "red", 0.0),
        ("dog..", "dog", 0.0),  # only one trailing period is dropped
        ("left", ["right", "Left"], 1.0),
    ],
)
def test_exact_match(prediction: str, reference: str | list[str], expected: float) -> None:
    assert exact_match(prediction, reference) == expected


# --------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("Yes, there is no cat hiding.", "yes"),  # first word decides
        ("There is not a cat.", "no"),
        ("There isn't a cat.", "no"),
        ("There isn\u2019t a cat.", "no"),
        ("I would say yes", "yes"),
        ("Notebook on the desk", None),  # "not" only as a whole word
        ("A dog", None),
        ("", None),
    ],
)
def test_yes_no(text: str, expected: str | None) -> None:
    assert yes_no(text) == expected


def test_pope_scores_counts() -> None:
    predictions = ["Yes", "No", "yes, there is", "There is no dog", "Maybe.", "Yes."]
    labels = ["yes", "no", "no", "yes", "yes", "YES"]
    # TP: 0, 5   TN: 1   FP: 2   FN: 3, 4 (4 is unparsable -> "no")
    result = pope_scores(predictions, labels)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (2, 1, 1, 2)
    assert result["unparsable"] == 1
    assert result["accuracy"] == 0.5
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == 0.5
    assert result["f1"] == pytest.approx(4 / 7)  # 2 * (2/3) * (1/2) / (2/3 + 1/2)
    assert result["yes_ratio"] == 0.5


def test_pope_scores_no_positive_predictions_gives_zero_precision() -> None:
    result = pope_scores(["no", "no"], ["yes", "no"])
    assert result["precision"] == 0.0 and result["recall"] == 0.0 and result["f1"] == 0.0
    assert result["accuracy"] == 0.5


@pytest.mark.parametrize(
    ("predictions", "labels", "message"),
    [
        (["yes"], ["yes", "no"], "equal lengths"),
        (["yes"], ["maybe"], "labels\\[0\\]"),
        ([], [], "at least one"),
    ],
)
def test_pope_scores_rejects_bad_input(
    predictions: list[str], labels: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        pope_scores(predictions, labels)


# --------------------------------------------------------------------------- MME


def _rec(category: str, image: str, prediction: str, label: str) -> dict[str, str]:
    return {"category": category, "image_id": image, "prediction": prediction, "label": label}


def test_mme_pair_with_one_wrong_answer() -> None:
    result = mme_scores(
        [_rec("existence", "img1", "Yes", "yes"), _rec("existence", "img1", "Yes", "no")]
    )
    assert result["existence"]["acc"] == 50.0
    assert result["existence"]["acc_plus"] == 0.0
    assert result["existence"]["score"] == 50.0
    assert result["perception"] == {"score": 50.0, "categories": 1}
    assert result["cognition"] == {"score": 0, "categories": 0}


def test_mme_categories_and_group_totals() -> None:
    records = [
        # existence: img1 (right, wrong), img2 (right, right) -> acc 75, acc+ 50
        _rec("existence", "img1", "yes", "yes"),
        _rec("existence", "img1", "yes", "no"),
        _rec("existence", "img2", "Yes, it is.", "yes"),
        _rec("existence", "img2", "No", "no"),
        # OCR (matched case-insensitively): one pair, both right -> 200
        _rec("ocr", "img3", "yes", "yes"),
        _rec("ocr", "img3", "no", "no"),
        # code_reasoning: unparsable answer is wrong, not "no" -> acc 50, acc+ 0
        _rec("code_reasoning", "img4", "The code prints 3", "no"),
        _rec("code_reasoning", "img4", "yes", "yes"),
        # unknown category: reported, in no total
        _rec("mystery", "img5", "yes", "yes"),
    ]
    result = mme_scores(records)
    assert result["existence"] == {
        "acc": 75.0, "acc_plus": 50.0, "score": 125.0, "questions": 4, "images": 2,
    }  # fmt: skip
    assert result["ocr"]["score"] == 200.0
    assert result["code_reasoning"]["acc"] == 50.0 and result["code_reasoning"]["acc_plus"] == 0
    assert result["mystery"]["score"] == 200.0
    assert result["perception"] == {"score": 325.0, "categories": 2}
    assert result["cognition"] == {"score": 50.0, "categories": 1}


def test_mme_same_image_id_in_two_categories_is_kept_apart() -> None:
    result = mme_scores([_rec("color", "img", "yes", "yes"), _rec("count", "img", "no", "yes")])
    assert result["color"]["acc_plus"] == 100.0 and result["count"]["acc_plus"] == 0.0


def test_mme_rejects_bad_records() -> None:
    with pytest.raises(ValueError, match="lacks \\['label'\\]"):
        mme_scores([{"category": "color", "image_id": "i", "prediction": "yes"}])
    with pytest.raises(ValueError, match="label"):
        mme_scores([_rec("color", "i", "yes", "perhaps")])
    with pytest.raises(ValueError, match="clashes"):
        mme_scores([_rec("perception", "i", "yes", "yes")])
    with pytest.raises(ValueError, match="at least one"):
        mme_scores([])


# --------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert set(METRICS) == {"vqa_accuracy", "anls", "relaxed_accuracy", "exact_match"}


@pytest.mark.parametrize(
    ("metric", "prediction", "references", "expected"),
    [
        ("vqa_accuracy", "two", ["2", "2", "2", "cat"], 0.75),  # (2 + 2 + 2 + 3) / 12
        ("anls", "sitting", ["kitten"], 4 / 7),
        ("relaxed_accuracy", "104.9", ["100"], 1.0),
        ("exact_match", "Yes.", ["yes"], 1.0),
    ],
)
def test_score_dispatches(
    metric: str, prediction: str, references: list[str], expected: float
) -> None:
    assert score(metric, prediction, references) == pytest.approx(expected)
    assert METRICS[metric](prediction, references) == pytest.approx(expected)


def test_score_unknown_metric_lists_allowed() -> None:
    with pytest.raises(ValueError, match="'bleu'.*anls.*exact_match.*relaxed_accuracy"):
        score("bleu", "a", ["a"])


def test_aggregate() -> None:
    assert aggregate([]) == 0.0
    assert aggregate([1.0, 0.0, 0.5]) == 0.5
    assert aggregate([vqa_accuracy("2", ["two"] * 2 + ["x"] * 8)] * 3) == pytest.approx(0.6)
