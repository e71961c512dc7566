"""Every source loader on fixtures in the source's real schema, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from birbal.config.data import (
    HubOrPath,
    InstructionRowsSource,
    LimaSource,
    MathInstructSource,
    PlatypusSource,
)
from birbal.data.loaders import (
    format_math_answer,
    keep_length,
    load_instruction_rows,
    load_lima,
    load_mathinstruct,
    load_platypus,
    strip_hash_suffix,
)
from birbal.data.sources import read_rows
from birbal.errors import DataError

SOURCES = "fixtures/sources"


def local(path: str) -> HubOrPath:
    return HubOrPath(path=f"{SOURCES}/{path}")


def math_source(**kw) -> MathInstructSource:
    return MathInstructSource(name="math", kind="mathinstruct", origin=local("mathinstruct/MathInstruct.jsonl"), **kw)


def test_math_answer_is_reformatted_around_the_marker():
    text = "He buys 2 * 3 = 6.\n#### 6\nThe answer is: 6"
    assert format_math_answer(text, "The answer is:") == "He buys 2 * 3 = 6.\nThe answer is: 6"
    # without the marker upstream left the text alone, `####` included
    assert format_math_answer("x = 4\n#### 4", "The answer is:") == "x = 4\n#### 4"
    assert strip_hash_suffix("a #### b #### c") == "a #### b"


def test_mathinstruct_keeps_the_three_cot_subsets_and_drops_print(tmp_path):
    rows, report = load_mathinstruct(math_source(lowercase_prob=0.0), 0, tmp_path)
    steps = report.steps
    assert list(steps) == ["read", "subset", "input_words", "cap", "length", "no_print"]
    assert steps["read"] == 27 and steps["subset"] == 25  # a PoT row and a camel row are not in the three subsets
    assert steps["input_words"] == 24  # "Compute 7 times 8." has 4 words
    assert all("print(" not in r["output"] for r in rows) and steps["no_print"] == 23
    assert all(r["instruction"] == "" and "####" not in r["output"] for r in rows)
    assert any(r["input"].startswith("Ali buys") for r in rows)


def test_mathinstruct_lowercasing_share_and_cap(tmp_path):
    rows, _ = load_mathinstruct(math_source(lowercase_prob=1.0), 0, tmp_path)
    assert all(r["input"] == r["input"].lower() for r in rows)
    none, _ = load_mathinstruct(math_source(lowercase_prob=0.0), 0, tmp_path)
    assert sum(r["input"] != r["input"].lower() for r in none) == len(none)
    capped, report = load_mathinstruct(math_source(cap=5), 0, tmp_path)
    assert report.steps["cap"] == 5 and len(capped) <= 5


def test_lima_takes_the_first_turn(tmp_path):
    rows, report = load_lima(LimaSource(name="lima", kind="lima", origin=local("lima/train.jsonl")), 0, tmp_path)
    assert report.steps == {"read": 5, "length": 5}
    multi = next(r for r in rows if r["input"].startswith("How do I keep basil"))
    assert multi["output"].startswith("Give basil") and "humidity" not in multi["output"]
    assert all(r["instruction"] == "" for r in rows)


def test_platypus_follows_upstream_code_by_default(tmp_path):
    source = PlatypusSource(name="platypus", kind="platypus", origin=local("open_platypus/train.jsonl"))
    rows, report = load_platypus(source, 0, tmp_path)
    assert report.steps["no_llm"] == 6  # airoboros dropped
    assert len(rows) == 6  # the 805-word row survives: upstream returned the unfiltered list
    assert all(r["instruction"] == "" and r["input"] for r in rows)
    described, _ = load_platypus(source.model_copy(update={"length_rule": "lt"}), 0, tmp_path)
    assert len(described) == 5


def test_instruction_rows_override(tmp_path):
    source = InstructionRowsSource(name="mix", kind="instruction_rows", origin=HubOrPath(path="fixtures/raw_mix.jsonl"),
                                   instruction_override="Pick one.")
    rows, report = load_instruction_rows(source, 0, tmp_path)
    assert len(rows) == report.steps["length"] > 0 and {r["instruction"] for r in rows} == {"Pick one."}


def test_length_rules_differ_at_the_limit():
    row = {"instruction": "a b", "input": "c"}  # 3 words
    assert not keep_length("lt", 3, row) and keep_length("le", 3, row) and keep_length("none", 1, row)


def test_wrong_schema_names_source_and_expectation(tmp_path):
    bad = tmp_path / "math.jsonl"
    bad.write_text(json.dumps({"source": "data/CoT/gsm_train.json", "question": "q", "output": "o"}) + "\n")
    source = MathInstructSource(name="math", kind="mathinstruct", origin=HubOrPath(path=str(bad)))
    with pytest.raises(DataError, match=r"source 'math'.*instruction.*expected schema"):
        load_mathinstruct(source, 0, tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="source 'lima': file not found"):
        load_lima(LimaSource(name="lima", kind="lima", origin=HubOrPath(path=str(tmp_path / "none.jsonl"))), 0,
                  tmp_path)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('[{"instruction": "a", "input": "b", "output": "c"}, {"instr')
    with pytest.raises(DataError, match="not a valid JSON array"):
        list(read_rows(corrupt, "x"))
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"lines.jsonl:2: not valid JSON"):
        list(read_rows(lines, "x"))


def test_hub_load_needs_a_pinned_revision(tmp_path):
    source = LimaSource(name="lima", kind="lima", origin=HubOrPath(hub_id="GAIR/lima", revision_note="unpinned"))
    with pytest.raises(DataError, match=r"GAIR/lima has no pinned revision \(unpinned\)"):
        load_lima(source, 0, tmp_path)


def test_json_array_is_streamed_like_json_lines(tmp_path):
    rows = [{"instruction": "i", "input": f"in {n}", "output": "o", "score": 0.5} for n in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    assert list(read_rows(Path(tmp_path / "a.json"), "x")) == rows


def test_hub_load_passes_the_pin_and_wraps_failures(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load(hub_id, config_name, **kw):
        calls.append((hub_id, config_name, kw["split"], kw["revision"], kw["streaming"]))
        if hub_id == "down/repo":
            raise ConnectionError("Name or service not known")
        return iter([{"conversations": ["a question of words", "an answer"], "source": "s"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    pin = "68958e98267f5fb4a52a03ebcdae4ae59213fa7c"
    rows, report = load_lima(LimaSource(name="lima", kind="lima", origin=HubOrPath(hub_id="GAIR/lima", revision=pin)),
                             0, tmp_path)
    assert calls == [("GAIR/lima", None, "train", pin, True)] and len(rows) == 1 and report.revision == pin
    down = LimaSource(name="lima", kind="lima", origin=HubOrPath(hub_id="down/repo", revision=pin))
    with pytest.raises(DataError, match=rf"source 'lima': could not load down/repo split train @ {pin}.*"
                                        r"ConnectionError: Name or service not known"):
        load_lima(down, 0, tmp_path)
