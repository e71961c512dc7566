"""Prompt wrapping and output cutting: the winners' rules as a named policy (`serve.postprocess`).

`birbal` reproduces what Upaya's submission server did (inference/submission_2/main.py), because that is the
behaviour that scored:

1. Wrapping. A prompt whose stripped text holds fewer than two blank-line breaks ("\\n\\n") is not a few-shot
   prompt, so it is put in the training template: `### Input:\\n{prompt}\\n\\n### Response:\\n` (the prompt as
   sent, not stripped). A prompt with two or more is sent stripped of surrounding whitespace.
2. Cutting. The output is cut at its first blank line ("\\n\\n"): HELM's few-shot examples are separated by
   blank lines, so anything after one is the model starting the next example.
3. "The answer is". An output that, stripped and lower-cased, starts with "the answer is" keeps only the first
   character after that phrase (once stripped): the model was trained to answer multiple choice that way, and
   HELM's multiple-choice metric wants the letter alone.

`none` leaves the prompt and the output untouched.

Echo requests (`echo_prompt`) ask for the logprobs of the prompt as given, so no policy touches them; the
winners wrapped those too and returned no prompt logprobs, which scored nothing either way (the open run specs
send no echo requests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PolicyName = Literal["birbal", "none"]

TEMPLATE_PREFIX = "### Input:\n"
TEMPLATE_SUFFIX = "\n\n### Response:\n"
BLANK_LINE = "\n\n"
ANSWER_PHRASE = "the answer is"
MIN_BLANK_LINES_FOR_FEW_SHOT = 2


def wrap_prompt(prompt: str) -> str:
    """Rule 1 of `birbal`."""
    stripped = prompt.strip()
    if stripped.count(BLANK_LINE) < MIN_BLANK_LINES_FOR_FEW_SHOT:
        return f"{TEMPLATE_PREFIX}{prompt}{TEMPLATE_SUFFIX}"
    return stripped


def cut_at_blank_line(output: str) -> str:
    """Rule 2 of `birbal`."""
    return output.split(BLANK_LINE, 1)[0]


def shorten_answer_phrase(output: str) -> str:
    """Rule 3 of `birbal`: "The answer is B, because..." -> "B"."""
    stripped = output.strip()
    if stripped.lower().startswith(ANSWER_PHRASE):
        return stripped[len(ANSWER_PHRASE):].strip()[:1]
    return output


@dataclass(frozen=True)
class Policy:
    name: PolicyName

    def prompt(self, prompt: str) -> str:
        return wrap_prompt(prompt) if self.name == "birbal" else prompt

    def output(self, text: str) -> str:
        if self.name == "none":
            return text
        return shorten_answer_phrase(cut_at_blank_line(text))


def get_policy(name: str) -> Policy:
    if name not in ("birbal", "none"):
        raise ValueError(f"serve.postprocess must be 'birbal' or 'none', got {name!r}")
    return Policy(name)  # type: ignore[arg-type]
