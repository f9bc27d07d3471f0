"""Scoring modes, agreement, and resumable per-part evaluation, on a hand-made fake model."""

from __future__ import annotations

import polars as pl
import pytest

from fgvlm.evaluate import scoring
from fgvlm.evaluate.prompts import mcq_prompt
from fgvlm.evaluate.scoring import (
    agreement,
    evaluate_mcq,
    files_fingerprint,
    merge_parts,
    part_path,
    question_items,
    score,
    score_to_parts,
)
from fgvlm.mcq import MCQItem, MCQModel


class FakeModel:
    """Scores from tables: option text -> log-prob, letter -> log-prob, qid -> generated text."""

    def __init__(self, option_scores=None, letter_scores=None, outputs=None, fail_after=None):
        self.name = "fake"
        self.option_scores = option_scores or {}
        self.letter_scores = letter_scores or {}
        self.outputs = outputs or {}
        self.fail_after = fail_after  # raise on this many-th call: a killed evaluation
        self.calls: list[list[str]] = []
        self.continuations: list[list[list[str]]] = []
        self.prompts: list[list[str]] = []

    def _call(self, items):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append([item.qid for item in items])

    def generate(self, items, *, max_new_tokens):
        self._call(items)
        return [self.outputs.get(item.qid, "B") for item in items]

    def continuation_logprobs(self, items, continuations):
        self._call(items)
        self.continuations.append(continuations)
        self.prompts.append([item.prompt for item in items])
        out = []
        for item, conts in zip(items, continuations, strict=True):
            table = self.letter_scores.get(item.qid, {}) if len(conts[0]) == 1 else {}
            out.append([table.get(c, self.option_scores.get(c, -len(c))) for c in conts])
        return out


OPTIONS = ["red square", "blue circle", "green triangle", "red circle", "blue square"]


def make_items(n: int) -> list[MCQItem]:
    return [
        MCQItem(f"q-{i:03d}", None, f"question {i}", OPTIONS[i % 5 :] + OPTIONS[: i % 5])
        for i in range(n)
    ]


def test_fake_model_satisfies_protocol():
    assert isinstance(FakeModel(), MCQModel)


def test_option_likelihood_picks_the_most_likely_option_text():
    model = FakeModel(option_scores={"red square": -3.0, "blue circle": -1.5, "red circle": -9})
    items = [MCQItem("q1", None, "p", ["red square", "blue circle", "red circle"])]
    (row,) = score(model, items, mode="option_likelihood", batch_size=4)
    assert row == {
        "qid": "q1",
        "output": "blue circle",
        "pred": "B",
        "mode": "option_likelihood",
        "scores": [-3.0, -1.5, -9.0],
    }
    assert model.continuations == [[["red square", "blue circle", "red circle"]]]


def test_option_likelihood_is_not_length_normalised_and_ties_go_first():
    # "a b c" sums to more than "x" per token but less in total: the total decides
    model = FakeModel(option_scores={"x": -2.0, "a b c": -3.0, "y": -2.0})
    items = [MCQItem("q1", None, "p", ["a b c", "x", "y"])]
    (row,) = score(model, items, mode="option_likelihood", batch_size=1)
    assert row["pred"] == "B" and row["output"] == "x"


def test_letter_likelihood_scores_the_option_letters():
    model = FakeModel(letter_scores={"q1": {"A": -2.0, "B": -4.0, "C": -0.5, "D": -3.0}})
    items = [MCQItem("q1", None, "p", ["w", "x", "y", "z"])]
    (row,) = score(model, items, mode="letter_likelihood", batch_size=2)
    assert (row["pred"], row["output"]) == ("C", "C")
    assert model.continuations == [[["A", "B", "C", "D"]]]


def test_generate_extracts_the_answer_or_none():
    model = FakeModel(outputs={"q-000": "B", "q-001": "zzz"})
    rows = score(model, make_items(2), mode="generate", batch_size=2, max_new_tokens=4)
    assert [(r["output"], r["pred"], r["scores"]) for r in rows] == [
        ("B", "B", None),
        ("zzz", None, None),
    ]


def test_nan_scores_and_bad_modes_are_errors():
    model = FakeModel(option_scores={"a": float("nan")})
    items = [MCQItem("q1", None, "p", ["a", "b"])]
    with pytest.raises(ValueError, match="q1: NaN"):
        score(model, items, mode="option_likelihood", batch_size=1)
    with pytest.raises(ValueError, match="unknown scoring mode"):
        score(model, items, mode="perplexity", batch_size=1)
    with pytest.raises(ValueError, match="occurs twice"):
        score(model, items * 2, mode="generate", batch_size=1)


def test_agreement():
    assert agreement(["A", "B", None, "C"], ["A", "C", None, "C"]) == 0.75
    assert agreement(["A"], ["B"]) == 0.0
    with pytest.raises(ValueError, match="length"):
        agreement(["A"], ["A", "B"])
    with pytest.raises(ValueError, match="empty"):
        agreement([], [])


def answers_of(items):
    return {item.qid: "ABCDE"[int(item.qid[-3:]) % 5] for item in items}


def test_killed_evaluation_resumes_without_recomputing_finished_parts(tmp_path):
    items = make_items(11)  # parts of 4: [0-3], [4-7], [8-10]
    settings = {"mode": "option_likelihood", "batch_size": 2, "part_size": 4}
    reference = tmp_path / "reference"
    score_to_parts(FakeModel(), items, reference, **settings)
    expected = merge_parts(reference, answers_of(items))

    parts = tmp_path / "parts"
    killed = FakeModel(fail_after=5)  # the 5th batch is the first of part 2
    with pytest.raises(KeyboardInterrupt):
        score_to_parts(killed, items, parts, **settings)
    assert sorted(p.name for p in parts.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    stamps = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}

    rerun = FakeModel()
    counts = score_to_parts(rerun, items, parts, **settings)
    assert counts == {"parts": 3, "computed": 1, "reused": 2}
    # within the part, the longest prompt ("question 10") is batched first
    assert rerun.calls == [["q-010", "q-008"], ["q-009"]]
    assert {p: parts.joinpath(p).stat().st_mtime_ns for p in stamps} == stamps
    resumed = merge_parts(parts, answers_of(items))
    assert resumed.equals(expected)
    assert part_path(parts, 2).read_bytes() == part_path(reference, 2).read_bytes()


def test_parts_are_recomputed_when_inputs_or_settings_change(tmp_path):
    items = make_items(6)
    score_to_parts(FakeModel(), items, tmp_path, mode="generate", batch_size=3, part_size=3)
    same = FakeModel()
    counts = score_to_parts(same, items, tmp_path, mode="generate", batch_size=3, part_size=3)
    assert counts["reused"] == 2 and same.calls == []
    for change in ({"max_new_tokens": 16}, {"fingerprint": "new-checkpoint"}):
        model = FakeModel()
        counts = score_to_parts(
            model, items, tmp_path, mode="generate", batch_size=3, part_size=3, **change
        )
        assert counts["computed"] == 2 and len(model.calls) == 2
    # other questions in a part's slot: recomputed; parts past the end: deleted
    fewer = make_items(4)[::-1]
    counts = score_to_parts(
        FakeModel(), fewer, tmp_path, mode="generate", batch_size=3, part_size=3
    )
    assert counts == {"parts": 2, "computed": 2, "reused": 0}
    assert sorted(p.name for p in tmp_path.glob("part-*")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]


def test_merge_parts_builds_the_predictions_frame(tmp_path):
    items = make_items(5)
    score_to_parts(FakeModel(), items, tmp_path, mode="generate", batch_size=2, part_size=2)
    answers = {item.qid: "B" if i % 2 else "A" for i, item in enumerate(items)}
    frame = merge_parts(tmp_path, answers)
    assert frame.columns == ["qid", "output", "pred", "correct", "mode", "scores"]
    assert frame["qid"].to_list() == list(answers)
    assert frame["correct"].to_list() == [False, True, False, True, False]
    with pytest.raises(ValueError, match="not scored yet"):
        merge_parts(tmp_path, {**answers, "q-999": "A"})
    with pytest.raises(ValueError, match="unknown questions"):
        merge_parts(tmp_path, dict(list(answers.items())[:4]))
    with pytest.raises(FileNotFoundError, match="part-"):
        merge_parts(tmp_path / "missing", answers)


def test_unparsable_answers_count_as_wrong(tmp_path):
    items = make_items(2)
    model = FakeModel(outputs={"q-000": "no idea", "q-001": "A"})
    score_to_parts(model, items, tmp_path, mode="generate", batch_size=2, part_size=2)
    frame = merge_parts(tmp_path, {"q-000": "A", "q-001": "A"})
    assert frame["pred"].to_list() == [None, "A"]
    assert frame["correct"].to_list() == [False, True]


def test_parts_are_byte_identical_across_runs(tmp_path):
    items = make_items(7)
    for run in ("a", "b"):
        score_to_parts(
            FakeModel(), items, tmp_path / run, mode="letter_likelihood", batch_size=3, part_size=4
        )
    for index in (0, 1):
        a, b = part_path(tmp_path / "a", index), part_path(tmp_path / "b", index)
        assert a.read_bytes() == b.read_bytes()


def test_evaluate_mcq_reports_agreement_with_generate(tmp_path):
    items = make_items(4)
    # option scores favour "blue circle"; generation always answers "B"
    model = FakeModel(option_scores={"blue circle": -0.1})
    predictions, summary = evaluate_mcq(
        model,
        lambda: iter(items),
        answers_of(items),
        tmp_path,
        mode="option_likelihood",
        batch_size=2,
        part_size=2,
    )
    chosen = [chr(65 + item.options.index("blue circle")) for item in items]
    assert predictions["pred"].to_list() == chosen
    assert predictions["generate_pred"].to_list() == ["B"] * 4
    assert summary == {
        "mode": "option_likelihood",
        "n": 4,
        "agreement_with_generate": chosen.count("B") / 4,
    }
    assert (tmp_path / "option_likelihood" / "part-00001.parquet").is_file()
    assert (tmp_path / "generate" / "part-00001.parquet").is_file()
    assert set(predictions.columns) >= {"qid", "output", "pred", "correct", "generate_correct"}


def test_question_items_build_prompts_from_records():
    record = {"qid": "b-000001", "question": "What is it?", "options": ["cat", "dog"], "hint": "h"}
    (item,) = question_items([(record, None)], style="llava")
    assert item == MCQItem(
        "b-000001",
        None,
        mcq_prompt("What is it?", ["cat", "dog"], hint="h"),
        ["cat", "dog"],
        "h\nWhat is it?",
    )
    (listed,) = question_items([(record, None)], style="llava", option_prompt="listed")
    assert listed.cloze_prompt is None
    with pytest.raises(ValueError, match="lacks 'options'"):
        list(question_items([({"qid": "x", "question": "q"}, None)], style="llava"))
    with pytest.raises(ValueError, match="option_prompt 'lettered'"):
        list(question_items([(record, None)], style="llava", option_prompt="lettered"))


def test_option_likelihood_scores_after_the_cloze_prompt_letters_after_the_full_one():
    model = FakeModel(option_scores={"dog": -1.0})
    item = MCQItem("q1", None, "full prompt with A. cat B. dog", ["cat", "dog"], "question only")
    (row,) = score(model, [item], mode="option_likelihood", batch_size=1)
    score(model, [item], mode="letter_likelihood", batch_size=1)
    assert model.prompts == [["question only"], ["full prompt with A. cat B. dog"]]
    assert row["pred"] == "B" and row["output"] == "dog"
    without = MCQItem("q2", None, "full prompt", ["cat", "dog"])
    score(model, [without], mode="option_likelihood", batch_size=1)
    assert model.prompts[-1] == ["full prompt"]


def test_files_fingerprint_changes_when_a_file_is_rewritten(tmp_path):
    (tmp_path / "model").mkdir()
    weights = tmp_path / "model" / "w.bin"
    weights.write_bytes(b"1234")
    before = files_fingerprint(tmp_path / "model")
    assert files_fingerprint(tmp_path / "model") == before
    weights.write_bytes(b"12345")
    assert files_fingerprint(tmp_path / "model") != before
    with pytest.raises(FileNotFoundError, match="missing"):
        files_fingerprint(tmp_path / "nope")


def test_part_schema_holds_nulls(tmp_path):
    items = make_items(1)
    score_to_parts(FakeModel(), items, tmp_path, mode="generate", batch_size=1, part_size=1)
    part = pl.read_parquet(part_path(tmp_path, 0))
    assert part.schema == pl.Schema(scoring.PART_SCHEMA)


class LengthModel(FakeModel):
    """A fake runner whose prompt length (image tokens included) it reports itself."""

    def prompt_length(self, item):
        return {"q-001": 50, "q-004": 40}.get(item.qid, len(item.prompt))


def test_batches_are_sorted_by_prompt_length_and_rows_keep_item_order(tmp_path):
    items = make_items(7)
    model = LengthModel()
    rows = score(model, items, mode="option_likelihood", batch_size=3)
    assert [r["qid"] for r in rows] == [item.qid for item in items]
    assert model.calls == [["q-001", "q-004", "q-000"], ["q-002", "q-003", "q-005"], ["q-006"]]
    unsorted = FakeModel()
    same = score(unsorted, items, mode="option_likelihood", batch_size=3, sort_by_length=False)
    assert unsorted.calls[0] == ["q-000", "q-001", "q-002"]
    assert same == rows
    # in parts: sorted within a part only, written in item order, resumed identically
    parts = LengthModel()
    score_to_parts(parts, items, tmp_path, mode="generate", batch_size=2, part_size=4)
    assert parts.calls == [["q-001", "q-000"], ["q-002", "q-003"], ["q-004", "q-005"], ["q-006"]]
    written = pl.read_parquet(part_path(tmp_path, 0))["qid"].to_list()
    assert written == ["q-000", "q-001", "q-002", "q-003"]


def test_option_likelihood_sorts_by_the_prompt_it_asks():
    """option_likelihood asks the cloze prompt: the sort key measures that prompt."""
    items = [
        MCQItem("q-000", None, "long listed prompt " * 5, OPTIONS, cloze_prompt="short"),
        MCQItem("q-001", None, "listed", OPTIONS, cloze_prompt="a much longer cloze prompt"),
    ]
    assert scoring.length_order(FakeModel(), items, "option_likelihood") == [1, 0]
    assert scoring.length_order(FakeModel(), items, "generate") == [0, 1]
