"""The combined-mix filters, in upstream's order."""

from birbal.data.filters import FilterCounts, MixFilter, words


def row(inp: str, out: str = "answer") -> dict:
    return {"instruction": "", "input": inp, "output": out}


def test_words_counts_like_split_on_space():
    assert words("") == 1 and words("a  b") == 3 and words("one two three") == 3


def test_duplicates_are_dropped_before_short_inputs():
    rows = [row("too short"), row("too short"), row("a long enough input here"), row("a long enough input here")]
    counts = FilterCounts()
    kept = list(MixFilter().apply(rows, counts))
    assert kept == [rows[2]]
    assert counts.as_dict() == {"read": 4, "duplicate_input": 2, "short_input": 1, "empty_output": 0, "kept": 1}


def test_four_words_is_short_five_is_not():
    kept = list(MixFilter().apply([row("one two three four"), row("one two three four five")], FilterCounts()))
    assert [r["input"] for r in kept] == ["one two three four five"]


def test_empty_outputs_kept_by_default_dropped_on_switch():
    rows = [row("an input of enough words", "")]
    assert len(list(MixFilter().apply(rows, FilterCounts()))) == 1
    counts = FilterCounts()
    assert list(MixFilter(drop_empty_output=True).apply(rows, counts)) == [] and counts.empty_output == 1


def test_dedupe_switch_off_keeps_duplicates():
    rows = [row("same input with five words"), row("same input with five words")]
    assert len(list(MixFilter(dedupe_inputs=False).apply(rows, FilterCounts()))) == 2
