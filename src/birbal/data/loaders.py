"""One loader per source: hub rows (or a local file of their schema) -> {instruction, input, output, source}.

Each loader applies what the winners' scripts did to that source alone, in their order, and counts the rows left
after every step in a `SourceReport`. The shuffle of the combined mix and the filters across sources are in
`mix.py`. Randomness comes from a `random.Random` seeded from (recipe seed, source name) so sources are
independent of each other's order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from birbal.config.data import (
    CnnDailyMailSource,
    InstructionRowsSource,
    LengthRule,
    LimaSource,
    MathInstructSource,
    OpenBookQASource,
    PlatypusSource,
    QuacSource,
)
from birbal.data.filters import words
from birbal.data.sources import (
    RAW_FIELDS,
    checked,
    describe,
    fetch_url,
    json_items,
    origin_rows,
    resolve_path,
    shown_path,
)
from birbal.errors import DataError
from birbal.fsutil import sha256_file


@dataclass
class SourceReport:
    """What happened to one source's rows: where they came from and how many survived each step."""

    name: str
    kind: str
    origin: str
    revision: str | None
    steps: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def count(self, step: str, rows: Iterable[dict]) -> Iterator[dict]:
        """Pass rows through, counting them under `step`. The key is made now, not on first row, so the steps
        keep the order of the code even though the generators run outermost first."""
        self.steps[step] = 0
        return self._counted(step, rows)

    def _counted(self, step: str, rows: Iterable[dict]) -> Iterator[dict]:
        for row in rows:
            self.steps[step] += 1
            yield row

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "origin": self.origin, "revision": self.revision, "rows_after": self.steps,
                **self.extra}


def source_rng(seed: int, name: str) -> random.Random:
    # str seeds are hashed with sha512 by `random`, so this is stable across processes and Python versions
    return random.Random(f"{seed}:{name}")


def keep_length(rule: LengthRule, limit: int, row: dict) -> bool:
    if rule == "none":
        return True
    n = words(f"{row['instruction']} {row['input']}")
    return n < limit if rule == "lt" else n <= limit


def length_filtered(rows: Iterable[dict], rule: LengthRule, limit: int) -> Iterator[dict]:
    return (row for row in rows if keep_length(rule, limit, row))


def _report(source, origin_text: str, revision: str | None) -> SourceReport:
    return SourceReport(name=source.name, kind=source.kind, origin=origin_text, revision=revision)


def _origin_report(source) -> SourceReport:
    origin = source.origin
    report = _report(source, describe(origin), None if origin.path else origin.revision)
    if origin.path:
        path = resolve_path(origin.path)
        if path.is_file():
            report.extra["sha256"] = sha256_file(path)
    return report


def _progress(rows: Iterable[dict], name: str) -> Iterator[dict]:
    return tqdm(rows, desc=f"reading {name}", unit="rows", leave=False, mininterval=2.0)


# --- MathInstruct ------------------------------------------------------------------------------------------------

def strip_hash_suffix(text: str) -> str:
    """GSM8K-style `... #### 42`: keep what comes before the last `####`."""
    return text[:text.rindex("####")].strip() if "####" in text else text


def format_math_answer(answer: str, marker: str) -> str:
    """Reasoning (its `####` suffix stripped), a newline, then the text from `marker` on; unchanged without it."""
    if marker not in answer:
        return answer.strip()
    at = answer.index(marker)
    return f"{strip_hash_suffix(answer[:at].strip())}\n{answer[at:].strip()}".strip()


def load_mathinstruct(source: MathInstructSource, seed: int, cache_dir: Path) -> tuple[list[dict], SourceReport]:
    report = _origin_report(source)
    rng = source_rng(seed, source.name)
    fields = {"source": str, "instruction": str, "output": str}
    rows = report.count("read", checked(_progress(origin_rows(source.origin, source.name, cache_dir), source.name),
                                        fields, source.name, report.origin))
    subsets = set(source.subsets)
    picked = report.count("subset", (r for r in rows if r["source"] in subsets))
    shaped = []
    for row in picked:
        question = row["instruction"].lower() if rng.random() < source.lowercase_prob else row["instruction"]
        shaped.append({"instruction": "", "input": question.strip(),
                       "output": format_math_answer(row["output"], source.answer_marker), "source": source.name})
    long_enough = [r for r in report.count("input_words", (r for r in shaped if words(r["input"]) >
                                                            source.min_input_words))]
    rng.shuffle(long_enough)
    capped = list(report.count("cap", long_enough[:source.cap]))
    # their combine step: length filter and `print(` filter after the cap, so fewer than `cap` rows remain
    kept = report.count("length", length_filtered(capped, source.length_rule, source.max_words))
    if source.drop_print:
        kept = report.count("no_print", (r for r in kept if "print(" not in r["output"]))
    return list(kept), report


# --- LIMA --------------------------------------------------------------------------------------------------------

def load_lima(source: LimaSource, seed: int, cache_dir: Path) -> tuple[list[dict], SourceReport]:
    report = _origin_report(source)
    rows = report.count("read", checked(origin_rows(source.origin, source.name, cache_dir), {"conversations": list},
                                        source.name, report.origin))
    turns = []
    for row in rows:
        convo = row["conversations"]
        if len(convo) < 2 or not all(isinstance(t, str) for t in convo[:2]):
            raise DataError(f"source {source.name!r}: {report.origin}: a conversation needs a user turn and an "
                            f"assistant turn (strings), got {convo[:2]!r}")
        turns.append({"instruction": "", "input": convo[0], "output": convo[1], "source": source.name})
    kept = report.count("length", length_filtered(turns, source.length_rule, source.max_words))
    return list(kept), report


# --- Open-Platypus -----------------------------------------------------------------------------------------------

def _platypus_row(row: dict, source: PlatypusSource) -> dict:
    if source.instruction_as_input and not row["input"].strip():
        return {"instruction": "", "input": row["instruction"], "output": row["output"], "source": source.name}
    return {"instruction": row["instruction"], "input": row["input"], "output": row["output"], "source": source.name}


def load_platypus(source: PlatypusSource, seed: int, cache_dir: Path) -> tuple[list[dict], SourceReport]:
    report = _origin_report(source)
    fields = {"instruction": str, "input": str, "output": str, "data_source": str}
    rows = report.count("read", checked(origin_rows(source.origin, source.name, cache_dir), fields, source.name,
                                        report.origin))
    excluded = set(source.exclude_data_sources)
    human = report.count("no_llm", (r for r in rows if r["data_source"] not in excluded))
    shaped = (_platypus_row(r, source) for r in human)
    kept = report.count("length", length_filtered(shaped, source.length_rule, source.max_words))
    return list(kept), report


# --- QuAC (HELM's quac_scenario.py) ----------------------------------------------------------------------------

QUAC_NO_ANSWER = " CANNOTANSWER"
QUAC_NO_ANSWER_ALIASES = ("Not enough information", "Cannot answer", "Do not know")


def _quac_dialogue(sample: Any, number: int, name: str) -> tuple[dict, list[dict]]:
    """The fields HELM's `create_prompt` reads, checked, so a wrong file stops with the dialogue's number."""
    where = f"source {name!r}: QuAC dialogue {number}"
    if not isinstance(sample, dict) or not all(isinstance(sample.get(k), str) for k in
                                               ("title", "background", "section_title")):
        raise DataError(f"{where}: expected {{title, background, section_title: str, paragraphs: [...]}} "
                        "(train_v0.2.json's schema)")
    paragraphs = sample.get("paragraphs")
    dialogue = paragraphs[0] if isinstance(paragraphs, list) and paragraphs else None
    if not isinstance(dialogue, dict) or not isinstance(dialogue.get("context"), str) \
            or not isinstance(dialogue.get("qas"), list):
        raise DataError(f"{where}: expected paragraphs[0] as {{context: str, qas: [...]}}")
    if not dialogue["context"].endswith(QUAC_NO_ANSWER):
        raise DataError(f"{where}: the context does not end in {QUAC_NO_ANSWER!r} (HELM asserts it does)")
    qas = dialogue["qas"]
    for qa in qas:
        if not (isinstance(qa, dict) and isinstance(qa.get("question"), str)
                and isinstance(qa.get("orig_answer"), dict) and isinstance(qa["orig_answer"].get("text"), str)
                and isinstance(qa.get("answers"), list)
                and all(isinstance(x, dict) and isinstance(x.get("text"), str) for x in qa["answers"])):
            raise DataError(f"{where}: expected every qas entry as {{question: str, orig_answer: {{text}}, "
                            "answers: [{text}]}")
    if len(qas) < 3:
        raise DataError(f"{where}: {len(qas)} questions; HELM draws randint(3, n) and needs at least 3")
    return dialogue, qas


def quac_instance(sample: dict, rng: random.Random, number: int, name: str) -> tuple[str, list[str]]:
    """HELM's `QuACScenario.create_prompt`, line for line (v0.5.16; unchanged since v0.3.0): the prompt and the
    de-duplicated references. As in HELM, the history holds the first k-1 pairs, so the pair just before the
    asked question is left out (`range(k - 1)`)."""
    dialogue, qas = _quac_dialogue(sample, number, name)
    prompt = f"Title: {sample['title']}\n\n"
    prompt += f"Background: {sample['background']}\n\n"
    prompt += f"Section: {sample['section_title']}\n"
    context = dialogue["context"][:-len(QUAC_NO_ANSWER)]
    prompt += f"Passage: {context}\n\n"
    k = rng.randint(3, len(qas)) - 1
    for i in range(k - 1):
        prompt += f"Question: {qas[i]['question']}\n"
        prompt += f"Answer: {qas[i]['orig_answer']['text']}\n\n"
    prompt += f"Question: {qas[k]['question']}"
    answers = list(dict.fromkeys(answer["text"] for answer in qas[k]["answers"]))
    if answers == ["CANNOTANSWER"]:
        answers.extend(QUAC_NO_ANSWER_ALIASES)
    if not answers:
        raise DataError(f"source {name!r}: QuAC dialogue {number}: question {k} has no answers")
    return prompt, answers


def quac_file(source: QuacSource, cache_dir: Path) -> Path:
    if source.origin.path:
        return resolve_path(source.origin.path)
    assert source.origin.file is not None
    return fetch_url(source.origin.file, cache_dir, source.name)


def load_quac(source: QuacSource, seed: int, cache_dir: Path) -> tuple[list[dict], SourceReport]:
    path = quac_file(source, cache_dir)
    origin = shown_path(path) if source.origin.path else source.origin.file.url  # type: ignore[union-attr]
    report = _report(source, origin, None)
    report.extra["sha256"] = sha256_file(path)
    helm_rng = random.Random(source.helm_seed)  # HELM: `random.seed(0)`, then the train split in file order
    rows = []
    for number, sample in enumerate(report.count("read", json_items(path, "data.item", source.name)), 1):
        prompt, answers = quac_instance(sample, helm_rng, number, source.name)
        rows.append({"instruction": source.instruction, "input": prompt, "output": answers[0],
                     "source": source.name})
    kept: Iterable[dict] = report.count("length", length_filtered(rows, source.length_rule, source.max_words))
    if source.sample is not None:
        kept = report.count("sample", reservoir(kept, source.sample, source_rng(seed, source.name)))
    return list(kept), report


# --- OpenBookQA ("openQA"; HELM's commonsense_scenario.OpenBookQA) -----------------------------------------------

OBQA_LETTERS = ("A", "B", "C", "D")


def openbookqa_item(row: Any, number: int, name: str) -> tuple[str, list[str], list[str], str]:
    """(stem, choice texts, choice labels, answer key) from a hub row (`question_stem`, `choices: {text, label}`)
    or a row of HELM's own source, the AI2 zip's Data/Main/train.jsonl (`question: {stem, choices: [{text,
    label}]}`), checked as HELM's `json_to_instance` asserts: four choices, the key's label at its letter."""
    where = f"source {name!r}: OpenBookQA row {number}"
    try:
        if "question_stem" in row:
            stem, texts, labels = row["question_stem"], list(row["choices"]["text"]), list(row["choices"]["label"])
        else:
            stem = row["question"]["stem"]
            texts = [c["text"] for c in row["question"]["choices"]]
            labels = [c["label"] for c in row["question"]["choices"]]
        key = row["answerKey"]
    except (KeyError, TypeError):
        raise DataError(f"{where}: expected {{question_stem, choices: {{text, label}}, answerKey}} (the hub rows) "
                        "or {question: {stem, choices: [{text, label}]}, answerKey} (the AI2 files)") from None
    if not (isinstance(stem, str) and all(isinstance(t, str) for t in texts) and isinstance(key, str)):
        raise DataError(f"{where}: stem, choice texts and answerKey must be strings")
    if len(texts) != 4 or key not in OBQA_LETTERS or labels[OBQA_LETTERS.index(key)] != key:
        raise DataError(f"{where}: HELM expects 4 choices labelled A-D with the answerKey's label at its letter; "
                        f"got labels {labels} and key {key!r}")
    return stem, texts, labels, key


def load_openbookqa(source: OpenBookQASource, seed: int, cache_dir: Path) -> tuple[list[dict], SourceReport]:
    report = _origin_report(source)
    rows = []
    for number, row in enumerate(report.count("read", origin_rows(source.origin, source.name, cache_dir)), 1):
        stem, texts, _, key = openbookqa_item(row, number, source.name)
        # HELM's multiple_choice_joint layout (input noun "Question", lettered choices), without its "Answer:"
        text = "\n".join([f"Question: {stem}", *(f"{letter}. {t}" for letter, t in zip(OBQA_LETTERS, texts,
                                                                                     strict=True))])
        answer = texts[OBQA_LETTERS.index(key)] if source.answer == "text" else key
        rows.append({"instruction": source.instruction, "input": text, "output": answer, "source": source.name})
    kept: Iterable[dict] = report.count("length", length_filtered(rows, source.length_rule, source.max_words))
    if source.sample is not None:
        kept = report.count("sample", reservoir(kept, source.sample, source_rng(seed, source.name)))
    return list(kept), report


# --- CNN/DailyMail (HELM's summarization_scenario.py, cnn-dm) -----------------------------------------------------

def reservoir(rows: Iterable[dict], k: int, rng: random.Random) -> list[dict]:
    """A uniform random sample of k rows in one pass, holding only k (the train split is 287k articles)."""
    sample: list[dict] = []
    for seen, row in enumerate(rows):
        if seen < k:
            sample.append(row)
        else:
            slot = rng.randint(0, seen)
            if slot < k:
                sample[slot] = row
    return sample


def helm_clean(text: str, max_length: int | None = None) -> str:
    """HELM's `SummarizationScenario._clean_and_truncate`: newlines to spaces, whitespace collapsed, the first
    `max_length` words."""
    return " ".join(text.replace("\n", " ").split()[:max_length])


def helm_summarization_train(rows: Iterable[dict], source: CnnDailyMailSource) -> Iterator[dict]:
    """HELM's `get_instances` for the train split: clean and cut, then drop articles outside the length window."""
    for row in rows:
        article = helm_clean(row["article"], source.doc_max_length)
        summary = helm_clean(row["highlights"])
        words_in = len(article.split())
        if source.sampling_max_length and words_in > source.sampling_max_length:
            continue
        if source.sampling_min_length and words_in < source.sampling_min_length:
            continue
        yield {"instruction": source.instruction, "input": article, "output": summary, "source": source.name}


def load_cnn_dailymail(source: CnnDailyMailSource, seed: int, cache_dir: Path) -> tuple[list[dict], SourceReport]:
    report = _origin_report(source)
    rows = report.count("read", checked(_progress(origin_rows(source.origin, source.name, cache_dir), source.name),
                                        {"article": str, "highlights": str}, source.name, report.origin))
    helm = report.count("helm_length_window", helm_summarization_train(rows, source))
    kept: Iterable[dict] = report.count("length", length_filtered(helm, source.length_rule, source.max_words))
    if source.sample is not None:
        kept = report.count("sample", reservoir(kept, source.sample, source_rng(seed, source.name)))
    return list(kept), report


# --- rows already shaped (the winners' Drive files) --------------------------------------------------------------

def load_instruction_rows(source: InstructionRowsSource, seed: int,
                          cache_dir: Path) -> tuple[list[dict], SourceReport]:
    report = _origin_report(source)
    rows = report.count("read", checked(origin_rows(source.origin, source.name, cache_dir), RAW_FIELDS,
                                        source.name, report.origin))
    shaped = ({"instruction": source.instruction_override if source.instruction_override is not None
               else r["instruction"], "input": r["input"], "output": r["output"], "source": source.name}
              for r in rows)
    kept = report.count("length", length_filtered(shaped, source.length_rule, source.max_words))
    return list(kept), report


Loader = Callable[[Any, int, Path], tuple[list[dict], SourceReport]]
LOADERS: dict[str, Loader] = {
    "mathinstruct": load_mathinstruct,
    "lima": load_lima,
    "platypus": load_platypus,
    "quac": load_quac,
    "openbookqa": load_openbookqa,
    "cnn_dailymail": load_cnn_dailymail,
    "instruction_rows": load_instruction_rows,
}
