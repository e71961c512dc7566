"""The winners' prompt wrapping and output rules, one by one, and the `none` policy."""

from __future__ import annotations

import pytest

from birbal.serve.postprocess import cut_at_blank_line, get_policy, shorten_answer_phrase, wrap_prompt


def test_rule1_a_prompt_with_fewer_than_two_blank_lines_is_wrapped_as_sent():
    assert wrap_prompt("What is 2+2?") == "### Input:\nWhat is 2+2?\n\n### Response:\n"
    # One blank line is still "fewer than two"; the prompt goes in unstripped.
    assert wrap_prompt("  Context\n\nQuestion ") == "### Input:\n  Context\n\nQuestion \n\n### Response:\n"


def test_rule1_a_few_shot_prompt_is_sent_stripped():
    prompt = "\nQ: a\nA: 1\n\nQ: b\nA: 2\n\nQ: c\nA:  \n"
    assert wrap_prompt(prompt) == prompt.strip()


def test_rule1_counts_blank_lines_after_stripping():
    # The trailing "\n\n" is stripped away before counting, so this holds one break: wrapped.
    assert wrap_prompt("a\n\nb\n\n").startswith("### Input:\n")


def test_rule2_the_output_is_cut_at_the_first_blank_line():
    assert cut_at_blank_line(" B\n\nQuestion: next") == " B"
    assert cut_at_blank_line("line one\nline two") == "line one\nline two"
    assert cut_at_blank_line("\n\nall gone") == ""


@pytest.mark.parametrize("output, expected", [
    ("The answer is B, because...", "B"),
    ("  the answer is   (C)", "("),
    ("THE ANSWER IS d", "d"),
    ("The answer is", ""),
    ("I think the answer is B", "I think the answer is B"),
])
def test_rule3_the_answer_is_keeps_the_first_character_after_it(output, expected):
    assert shorten_answer_phrase(output) == expected


def test_birbal_policy_applies_the_rules_in_order():
    policy = get_policy("birbal")
    assert policy.prompt("Hi") == wrap_prompt("Hi")
    assert policy.output("The answer is A.\n\nThe answer is B.") == "A"
    assert policy.output(" Paris is the capital.\n\nNext") == " Paris is the capital."


def test_none_policy_changes_nothing():
    policy = get_policy("none")
    assert policy.prompt("Hi") == "Hi"
    assert policy.output("The answer is A.\n\nmore") == "The answer is A.\n\nmore"


def test_unknown_policy_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="serve.postprocess"):
        get_policy("fancy")
