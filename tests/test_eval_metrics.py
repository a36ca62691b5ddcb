"""LongBench metrics against hand-computed examples (the arithmetic is in the comments)."""

from __future__ import annotations

import pytest

from eval.metrics import (
    METRICS, classification_score, code_sim_score, count_score, metric_for, normalize_answer,
    qa_f1_score, retrieval_score, rouge_score, score_sample, task_score,
)
from eval.tasks import TASK_NAMES, get_task


# ---------------------------------------------------------------- normalize_answer / QA F1


@pytest.mark.parametrize("text, expected", [
    # lower -> "the cat's  hat!"; drop punctuation -> "the cats  hat"; drop "the"; squeeze spaces
    ("The Cat's  hat!", "cats hat"),
    ("An apple a day", "apple day"),
    ("theatre", "theatre"),           # articles only as whole words
    ("  A.B.C.  ", "abc"),            # "a.b.c." -> "abc": punctuation goes first, so no article left
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_qa_f1_partial_overlap():
    # pred tokens [big, red, dog], reference [red, dog]: 2 common; P = 2/3, R = 1
    # F1 = 2 * (2/3) * 1 / (2/3 + 1) = (4/3) / (5/3) = 0.8
    assert qa_f1_score("the big red dog", "a red dog") == pytest.approx(0.8)


def test_qa_f1_counts_multiset_overlap():
    # pred [dog, dog, cat], ref [dog]: common = min(2, 1) = 1; P = 1/3, R = 1 -> F1 = (2/3)/(4/3) = 0.5
    assert qa_f1_score("dog dog cat", "dog") == pytest.approx(0.5)


def test_qa_f1_exact_disjoint_and_empty():
    assert qa_f1_score("The Eiffel Tower.", "eiffel tower") == 1.0
    assert qa_f1_score("Paris", "London") == 0.0
    assert qa_f1_score("", "London") == 0.0
    assert qa_f1_score("the", "a") == 0.0  # both normalise to nothing


# ---------------------------------------------------------------- Rouge-L


def test_rouge_l_f():
    # 6 tokens each; LCS = the cat on the mat = 5 -> P = R = 5/6 -> F = 5/6
    assert rouge_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)


def test_rouge_l_tokenisation_is_rouge_score_s():
    # rouge_score lower-cases and drops punctuation: [the, cat, sat] both sides -> 1.0
    # (LongBench's `rouge` package would keep "The"/"cat," as distinct tokens: a documented gap)
    assert rouge_score("The cat, sat.", "the cat sat") == pytest.approx(1.0)


def test_rouge_l_empty_is_zero():
    assert rouge_score("", "a summary") == 0.0
    assert rouge_score("...", "a summary") == 0.0


# ---------------------------------------------------------------- classification (trec)


CLASSES = ["Date", "Individual", "Other", "Other entity", "City"]


def test_classification_single_match():
    assert classification_score("Individual", "Individual", all_classes=CLASSES) == 1.0


def test_classification_two_matches_share_credit():
    # matches in all_classes order: [Date, Individual]; neither is a sub-string of "Individual"
    # -> reference among 2 matches -> 1/2
    assert classification_score("Individual or Date", "Individual", all_classes=CLASSES) == 0.5


def test_classification_wrong_class():
    assert classification_score("Date", "Individual", all_classes=CLASSES) == 0.0
    assert classification_score("no idea", "Individual", all_classes=CLASSES) == 0.0


def test_classification_drops_substrings_of_reference():
    # matches [Other, Other entity]; "Other" is a strict sub-string of the reference -> removed
    # -> [Other entity] -> 1/1
    assert classification_score("Other entity", "Other entity", all_classes=CLASSES) == 1.0


def test_classification_reproduces_longbench_skip_after_remove():
    # matches [ab, a, abc]. LongBench removes from the list it iterates: index 0 "ab" is removed,
    # the list becomes [a, abc], the iterator moves to index 1 ("abc") and never looks at "a".
    # Left: [a, abc] -> reference among 2 -> 0.5 (a bug-free loop would give 1.0).
    assert classification_score("abc", "abc", all_classes=["ab", "a", "abc"]) == 0.5


def test_classification_needs_classes():
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("Date", "Date")


# ---------------------------------------------------------------- retrieval / count


def test_retrieval_score():
    assert retrieval_score("Paragraph 19", "Paragraph 19") == 1.0
    # numbers [19, 3], one equals 19 -> 1/2
    assert retrieval_score("Paragraph 19 or Paragraph 3", "Paragraph 19") == 0.5
    assert retrieval_score("Paragraph 190", "Paragraph 19") == 0.0  # whole numbers only
    assert retrieval_score("I do not know", "Paragraph 19") == 0.0  # no numbers at all
    with pytest.raises(ValueError):
        retrieval_score("Paragraph 1", "nineteen")


def test_count_score():
    # numbers [7, 10], one equals 7 -> 1/2
    assert count_score("There are 7 unique paragraphs out of 10", "7") == 0.5
    assert count_score("7", "7") == 1.0
    assert count_score("seven", "7") == 0.0


# ---------------------------------------------------------------- code similarity


def test_code_sim_skips_fences_and_comments():
    # "```python" has a backtick, "# comment" a hash -> first kept line is "    return x + 1"
    pred = "```python\n# comment\n    return x + 1\nfoo()"
    assert code_sim_score(pred, "    return x + 1") == 1.0


def test_code_sim_skips_lines_containing_markers_anywhere():
    # LongBench tests `"#" not in line`, so a trailing comment disqualifies the line too
    assert code_sim_score("x = 1  # set\ny = 2", "y = 2") == 1.0
    assert code_sim_score("a = b // c\nz", "z") == 1.0


def test_code_sim_ratio_is_rounded_like_fuzzywuzzy():
    # Indel ratio of "abcd"/"abce": LCS 3, 2*3/(4+4) = 0.75
    assert code_sim_score("abcd", "abce") == 0.75
    # "abc"/"abcd": 2*3/7 = 0.857142... -> fuzzywuzzy's int(round(85.71)) = 86 -> 0.86
    assert code_sim_score("abc", "abcd") == 0.86


def test_code_sim_empty_is_zero():
    assert code_sim_score("", "x = 1") == 0.0
    assert code_sim_score("```\n# only comments", "x = 1") == 0.0
    assert code_sim_score("\n\nx = 1", "x = 1") == 1.0  # leading newlines are stripped first


# ---------------------------------------------------------------- per task


def test_every_task_has_a_metric():
    for name in TASK_NAMES:
        assert metric_for(name) is METRICS[get_task(name).metric]


def test_score_sample_max_over_answers():
    answers = ["5 percent points.", "0.05 F1"]
    # "0.05 F1" -> "005 f1" matches the second answer exactly; the first gives 0
    assert score_sample("qasper", "0.05 F1", answers) == 1.0
    # "5 points": [5, points] vs [5, percent, points]: P = 1, R = 2/3 -> F1 = 0.8
    assert score_sample("qasper", "5 points", answers) == pytest.approx(0.8)


def test_score_sample_first_line_only_for_trec_triviaqa_samsum():
    assert score_sample("triviaqa", "\nParis\nThe capital is Paris", ["Paris"]) == 1.0
    # narrativeqa keeps the whole prediction: [paris, is, nice] vs [paris]: P = 1/3, R = 1 -> 0.5
    assert score_sample("narrativeqa", "Paris\nis nice", ["Paris"]) == pytest.approx(0.5)
    assert score_sample("trec", "Individual\nDate", ["Individual"], CLASSES) == 1.0
    assert score_sample("samsum", "the cat sat\nextra words here", ["the cat sat"]) == pytest.approx(1.0)


def test_score_sample_range_and_unknown_task():
    assert 0.0 <= score_sample("gov_report", "a summary of the report", ["the report summary"]) <= 1.0
    with pytest.raises(KeyError, match="unknown LongBench task"):
        score_sample("no_such_task", "x", ["x"])


def test_task_score_is_rounded_percentage():
    # per-sample 1.0 and 0.5 -> 100 * 1.5 / 2 = 75.0
    assert task_score("hotpotqa", ["Bob Dylan", "dog dog cat"], [["Bob Dylan"], ["dog"]]) == 75.0
    # 1.0, 0, 0 -> 100/3 = 33.333... -> 33.33
    assert task_score("passage_retrieval_en", ["Paragraph 2", "3", "x"],
                      [["Paragraph 2"], ["Paragraph 4"], ["Paragraph 1"]]) == 33.33
    # trec with classes per sample
    assert task_score("trec", ["Date", "Individual"], [["Date"], ["Date"]], [CLASSES, CLASSES]) == 50.0


def test_task_score_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError):
        task_score("hotpotqa", ["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        task_score("hotpotqa", [], [])


# ---------------------------------------------------------------- real data


def test_gold_answers_score_100_and_empty_predictions_0_on_real_files():
    from eval.data import available_tasks, load_task

    tasks = available_tasks()
    if not tasks:
        pytest.skip("no longbench-mini files")
    for name in tasks:
        samples = load_task(name)
        answers = [s.answers for s in samples]
        classes = [s.all_classes for s in samples]
        assert task_score(name, [a[0] for a in answers], answers, classes) == 100.0, name
        assert task_score(name, [""] * len(samples), answers, classes) == 0.0, name
