"""N-gram decontamination against benchmark fixtures in their real schemas."""

from __future__ import annotations

import json

import pytest

from birbal.config.data import Benchmark, ContaminationConfig, HubOrPath
from birbal.data.contamination import Decontaminator, ngram_hashes, normalise, strings_in
from birbal.errors import DataError

GSM = Benchmark(name="gsm8k", origin=HubOrPath(path="fixtures/sources/benchmarks/gsm8k_test.jsonl"),
                text_fields=("question", "answer"))
MMLU = Benchmark(name="mmlu", origin=HubOrPath(path="fixtures/sources/benchmarks/mmlu_test.jsonl"),
                 text_fields=("question", "choices"))
LEAK = ("Ali buys 2 boxes of pencils with 3 pencils in each box and already has 5 pencils. "
        "How many pencils does Ali have now?")


def test_normalise_and_ngrams():
    assert normalise("Hello, World!  It's   2023_x") == ["hello", "world", "it", "s", "2023", "x"]
    assert len(ngram_hashes("a b c d", 2)) == 3 and ngram_hashes("a b", 3) == set()
    assert ngram_hashes("A, b c", 3) == ngram_hashes("a b C.", 3)
    assert list(strings_in({"choices": ["x", "y"], "labels": [1, 0]})) == ["x", "y"]


def rows():
    return [{"question": f"### Input:\n{LEAK.lower()}\n\n### Response:\n", "answer": "11", "source": "math"},
            {"question": "### Input:\nWhat is the capital of France and why is it famous?\n\n### Response:\n",
             "answer": "Paris.", "source": "lima"}]


def test_report_mode_counts_and_keeps():
    cleaner = Decontaminator(ContaminationConfig(benchmarks=(GSM, MMLU)), "report", tmp_cache())
    kept = list(cleaner.filter(rows()))
    report = cleaner.report.as_dict()
    assert len(kept) == 2 and report["overlaps"] == {"math": {"gsm8k": 1}}
    assert report["rows_checked"] == {"lima": 1, "math": 1} and report["rows_dropped"] == 0
    assert report["benchmarks"]["mmlu"]["items"] == 2


def test_drop_mode_removes_overlapping_rows():
    cleaner = Decontaminator(ContaminationConfig(benchmarks=(GSM,)), "drop", tmp_cache())
    kept = list(cleaner.filter(rows()))
    assert [r["source"] for r in kept] == ["lima"] and cleaner.report.rows_dropped == 1


def test_shorter_ngram_finds_more():
    short = Benchmark(name="mmlu", origin=MMLU.origin, text_fields=("choices",))
    row = {"question": "Choose: carbon dioxide or oxygen", "answer": "Carbon dioxide", "source": "s"}
    assert list(Decontaminator(ContaminationConfig(ngram=2, benchmarks=(short,)), "drop", tmp_cache())
                .filter([row])) == []
    assert len(list(Decontaminator(ContaminationConfig(benchmarks=(short,)), "drop", tmp_cache())
                    .filter([row]))) == 1


def test_benchmark_wrong_schema(tmp_path):
    bad = tmp_path / "mmlu.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    bench = Benchmark(name="mmlu", origin=HubOrPath(path=str(bad)), text_fields=("question",))
    with pytest.raises(DataError, match="benchmark 'mmlu'.*lacks field\\(s\\) question"):
        Decontaminator(ContaminationConfig(benchmarks=(bench,)), "report", tmp_path).index()


def tmp_cache():
    import tempfile
    from pathlib import Path

    return Path(tempfile.gettempdir())


def test_unpinned_hub_benchmark_is_skipped_in_report_mode_and_stops_drop_mode():
    unpinned = Benchmark(name="bbq", origin=HubOrPath(hub_id="heegyu/bbq", split="test", revision_note="no pin"),
                         text_fields=("context",))
    cleaner = Decontaminator(ContaminationConfig(benchmarks=(unpinned, GSM)), "report", tmp_cache())
    assert len(list(cleaner.filter(rows()))) == 2
    assert cleaner.report.benchmarks["bbq"]["skipped"] == "no pinned revision (no pin)"
    with pytest.raises(DataError, match="heegyu/bbq has no pinned revision"):
        list(Decontaminator(ContaminationConfig(benchmarks=(unpinned,)), "drop", tmp_cache()).filter(rows()))
