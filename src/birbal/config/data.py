"""Where the training data comes from and how it is filtered, formatted, split and checked for contamination.

Defaults follow what the winners' code did (`data_prep/*.py` in Upaya07/NeurIPS-llm-efficiency-challenge); where
their description says otherwise, the description is a switch here. docs/DATA.md lists every such choice.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from birbal.config.base import Section

HEX40 = r"^[0-9a-f]{40}$"
HEX64 = r"^[0-9a-f]{64}$"

# The instruction the winners gave the sentence-completion ("openQA") set, replacing the one in the file.
OPENQA_INSTRUCTION = (
    "You are given an incomplete sentence along with a few reference completions. Only one of the reference "
    "completion is coherent and correct based on the context in sentence and all other reference completions are "
    "incorrect. Your task is to choose best matching completion from reference options and return that."
)

# How a source's `instruction + " " + input` word count is compared with `max_words`; upstream varied per source:
# `< 800` (MathInstruct, LIMA, Natural Instructions), `> 800 -> drop` i.e. `<= 800` (QuAC, openQA, CNN/DailyMail),
# and no filter at all for Open-Platypus (their code computed the filtered list, then returned the unfiltered one).
LengthRule = Literal["lt", "le", "none"]


class PublishedData(Section):
    """The winners' final mix as published: JSON arrays of {question, answer} rows (question already templated)."""

    name_or_path: str = Field(description="Hub dataset id, or a local folder holding the two files.")
    revision: str | None = Field(None, pattern=HEX40, description="40-hex commit of the dataset repo.")
    revision_note: str | None = None
    train_file: str = "train_dataset.json"
    eval_file: str = "eval_dataset.json"
    expected_rows: dict[Literal["train", "eval"], int] | None = Field(
        None, description="Row counts the files must have; a mismatch stops the stage. Null: not known yet."
    )
    sha256: dict[Literal["train", "eval"], str] | None = Field(
        None, description="sha256 of each file as downloaded; a mismatch stops the stage. Null: not known yet."
    )


class HubOrPath(Section):
    """Rows from a hub dataset at a pinned revision, or from a local file (JSON lines or a JSON array) of the
    same schema. A hub load without a 40-hex revision is refused at run time, not at config time, so a profile
    can carry an honest `revision: null` with a note until someone pins it."""

    hub_id: str | None = None
    config_name: str | None = None
    split: str = "train"
    revision: str | None = Field(None, pattern=HEX40)
    revision_note: str | None = None
    path: str | None = Field(None, description="Local file in the hub rows' schema; wins over hub_id when set.")

    @model_validator(mode="after")
    def _one_origin(self) -> HubOrPath:
        if not self.hub_id and not self.path:
            raise ValueError("a source needs hub_id or path")
        return self


class _SourceBase(Section):
    name: str = Field(min_length=1, description="Label carried in every row's `source` field.")
    max_words: int = Field(800, gt=0)
    length_rule: LengthRule = "lt"


class MathInstructSource(_SourceBase):
    """TIGER-Lab/MathInstruct rows {source, instruction, output}: three CoT subsets, reformatted (their
    `prepare_math_reasoning_dataset.py`)."""

    kind: Literal["mathinstruct"]
    origin: HubOrPath
    subsets: tuple[str, ...] = ("data/CoT/gsm_train.json", "data/CoT/aqua_rat.json", "data/CoT/MATH_train.json")
    lowercase_prob: float = Field(0.3, ge=0.0, le=1.0, description=(
        "Share of questions lower-cased. Code: randint(1,10) <= 3, i.e. 0.3; the unused `lower_case_prob = 0.2` "
        "in the same file is the other reading."))
    answer_marker: str = "The answer is:"
    min_input_words: int = Field(4, ge=0, description="Their math script dropped inputs of this many words or fewer "
                                                       "before the cap.")
    cap: int = Field(50_000, gt=0)
    drop_print: bool = Field(True, description="Drop outputs containing `print(` (program-of-thought leftovers).")


class LimaSource(_SourceBase):
    """GAIR/lima rows {conversations, source}: the first user/assistant turn, no instruction."""

    kind: Literal["lima"]
    origin: HubOrPath


class PlatypusSource(_SourceBase):
    """garage-bAInd/Open-Platypus rows {input, output, instruction, data_source}."""

    kind: Literal["platypus"]
    origin: HubOrPath
    length_rule: LengthRule = Field("none", description=(
        "Code: 'none' (the filtered list was discarded: `return data`); the described filter is 'lt'."))
    exclude_data_sources: tuple[str, ...] = Field(("airoboros",), description=(
        "Subsets dropped as LLM-generated ('platypus_no_llm'); which ones upstream removed is not published."))
    instruction_as_input: bool = Field(True, description=(
        "Move the question from `instruction` into an empty `input`. The hub rows keep `input` empty, which "
        "upstream's combine filters (duplicate and <=4-word inputs) would drop entirely; their own file must have "
        "carried the question as input for Platypus to reach the mix."))


class UrlFile(Section):
    """One file fetched from a public URL (HELM's own source for a scenario) and checked against its sha256.

    No public sha256 is known for the files HELM downloads (its `ensure_file_downloaded` checks none), so `sha256`
    has no default: a rebuild refuses to run until it is set (`sha256sum` of the file once fetched), so that two
    rebuilds can only differ if the recipe says they do."""

    url: str = Field(pattern=r"^https?://")
    sha256: str | None = Field(None, pattern=HEX64)
    sha256_note: str | None = None


class QuacOrigin(Section):
    """QuAC's `train_v0.2.json` (`{"data": [dialogue, ...]}`): from its URL, or a local copy of that file."""

    file: UrlFile | None = None
    path: str | None = Field(None, description="Local copy of train_v0.2.json; wins over `file` when set.")

    @model_validator(mode="after")
    def _one_origin(self) -> QuacOrigin:
        if not self.file and not self.path:
            raise ValueError("a QuAC origin needs file (url + sha256) or path")
        return self


class QuacSource(_SourceBase):
    """QuAC as HELM's `quac_scenario.py` builds it (stanford-crfm/helm v0.5.16, unchanged since 2022): one instance
    per dialogue of `train_v0.2.json`, its stopping point drawn by `random.randint(3, len(qas)) - 1` from
    `random.seed(0)` in file order; the prompt is HELM's (title, background, section, passage, earlier Q/A pairs,
    the question); the answer is the first of that question's de-duplicated answers."""

    kind: Literal["quac"]
    origin: QuacOrigin
    length_rule: LengthRule = "le"
    helm_seed: int = Field(0, description="HELM's `random.seed(0)` before the train split.")
    instruction: str = Field("", description=(
        "HELM's QuAC adapter has no instructions (`instructions=\"\"`); upstream's own value is unpublished."))
    sample: int | None = Field(None, gt=0, description=(
        "Instances kept (seeded reservoir); None: all (11,567 train dialogues). Upstream's count is unpublished."))


class OpenBookQASource(_SourceBase):
    """"openQA": OpenBookQA train rows (allenai/openbookqa `main`: {id, question_stem, choices: {text, label},
    answerKey}), checked as HELM's `OpenBookQA.json_to_instance` checks them (4 choices, the key's label present);
    the input is the stem and its lettered choices, the answer the correct choice's text (upstream's instruction
    asks to "return" the completion)."""

    kind: Literal["openbookqa"]
    origin: HubOrPath
    length_rule: LengthRule = "le"
    instruction: str = Field(OPENQA_INSTRUCTION, description="Upstream's fixed instruction (combine_datasets.py).")
    answer: Literal["text", "letter"] = Field("text", description=(
        "text: the correct completion (the instruction's 'return that'); letter: HELM's multiple_choice_joint "
        "reference."))
    sample: int | None = Field(None, gt=0, description=(
        "Rows kept (seeded reservoir); None: all (4,957 train rows). Upstream's count is unpublished."))


class CnnDailyMailSource(_SourceBase):
    """CNN/DailyMail as HELM's `SummarizationScenario(dataset_name="cnn-dm")` builds its train split, from
    abisee/cnn_dailymail 3.0.0 rows {article, highlights, id} (HELM itself reads a pickle of the same corpus from
    its bucket): newlines to spaces, whitespace collapsed, articles cut to `doc_max_length` words, then train
    articles outside [sampling_min_length, sampling_max_length] words dropped (HELM's run spec: 512, 50, 150)."""

    kind: Literal["cnn_dailymail"]
    origin: HubOrPath
    length_rule: LengthRule = "le"
    instruction: str = Field("Summarize the above article in 3 sentences.", description=(
        "HELM's summarization adapter's output prefix (num_sents=3); upstream's own value is unpublished."))
    doc_max_length: int | None = Field(512, gt=0, description="HELM run spec `doc_max_length`; None: no cut.")
    sampling_min_length: int | None = Field(50, gt=0, description="HELM run spec; None: no minimum.")
    sampling_max_length: int | None = Field(150, gt=0, description="HELM run spec; None: no maximum.")
    sample: int | None = Field(None, gt=0, description="Rows kept (seeded reservoir; upstream's file is named "
                                                       "`..._random_train`, its size unpublished); None: all.")


class InstructionRowsSource(_SourceBase):
    """Rows already in {instruction, input, output} form (the winners' private Drive files had this form; the
    smoke profile's fixture mix)."""

    kind: Literal["instruction_rows"]
    origin: HubOrPath
    length_rule: LengthRule = "le"
    instruction_override: str | None = Field(None, description="Replace every row's instruction (openQA).")


class NIPredictions(Section):
    """The base model's few-shot predictions on each task: computed here (cached per task) or read from a file.

    The prompt is the one the winners' README prints: the Alpaca preamble, `### Instruction:` + the Definition, all
    Positive Examples shuffled, then the instance; the prediction shown there is 32 tokens with no stop sequence."""

    precomputed: str | None = Field(None, description=(
        "JSON lines of {task_file, id, orig_input, ground_truth: [..], prediction}, or a folder of per-task JSON "
        "arrays of the same rows (the winners' inference output). Skips inference."))
    num_shots: int | None = Field(None, ge=0, description="Positive Examples put before each instance; None: all "
                                                           "(the README's prompt).")
    shuffle_examples: bool = Field(True, description="Shuffle the examples per instance (the README: 'shuffled').")
    max_instances_per_task: int | None = Field(None, gt=0, description="Instances run per task (None: all).")
    max_new_tokens: int = Field(32, gt=0, description="The README's prediction is exactly 32 tokens: no stop.")
    max_prompt_tokens: int = Field(4096, gt=0, description="Longer prompts are cut from the left (ours).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description=(
        "The base model's precision (inferred: what a 4090 run of the unquantized base would use); CPU: float32."))
    load_in_4bit: bool = Field(False, description="Predict with the NF4 base instead (not upstream).")
    backend: Literal["hf", "vllm"] = Field("hf", description=(
        "hf: batched transformers generate; vllm: vLLM's offline engine (needs vllm installed)."))
    engine: Literal["static", "generate"] = Field("static", description=(
        "backend hf: static (batched prefill, then one-token steps over a static KV cache, each replayed as a "
        "CUDA graph on a GPU; birbal.data.static_engine) or generate (transformers' generate over a growing "
        "cache, the path before). Same greedy maths; a changed engine is a new prediction cache."))
    decode_attention: Literal["grouped", "sdpa", "triton"] = Field("grouped", description=(
        "engine static: the decode steps' attention, the serve engine's grouped one (the same attention without "
        "SDPA's 4x copy of the KV cache a step: 1.7x the instances/s on an H200; float rounding differs), SDPA, "
        "or triton: serve.decode_attention's Triton kernels (grouped without CUDA; not yet run on a GPU). "
        "Prompts run SDPA either way."))
    max_prefill_tokens: int | None = Field(16384, gt=0, description=(
        "engine static: most prompt tokens one prefill forward takes (a batch's rows prefilled in chunks into its "
        "cache; the same maths): caps the prefill's activations on a small card. None: the whole batch at once."))
    batch_size: int = Field(64, gt=0, description="Most sequences per forward (prompts sorted by length).")
    max_batch_tokens: int = Field(49152, gt=0, description=(
        "Most padded tokens (prompt + new) per batch, so long prompts run in smaller batches; engine static: "
        "also the KV cache's size, 128 KiB a token at the Mistral-7B shape. The defaults (49152, prefill chunks "
        "of 16384) are a 24 GB card's budget: 22.0 GiB allocated at the 7B shape, and on an H200 as fast as "
        "131072 in one prefill, which took 41 GiB (benchmarks/results, eighth session). A cache bigger than "
        "the GPU's free memory is refused before it is allocated."))
    processes: int | None = Field(None, gt=0, description=(
        "Worker processes (accelerate launch, one per GPU); None: one per visible GPU, 1 without CUDA."))


class NaturalInstructionsSource(_SourceBase):
    """allenai/natural-instructions task JSON files (Definition, Positive Examples, Instances), sampled where the
    base model was wrong: an exact-match quota per task by accuracy, ROUGE-L bands for generation tasks."""

    kind: Literal["natural_instructions"]
    tasks_dir: str = Field(description="Folder of task JSON files (a checkout's `tasks/`).")
    tasks_dir_revision: str | None = Field(None, pattern=HEX40, description="Commit of the checkout (recorded).")
    tasks_dir_note: str | None = None
    task_list: str = Field("reference/selected_NI_tasks.txt", description="One task name per line (462 upstream).")
    exact_match_tasks: str | None = Field(None, description=(
        "File naming the exact-match ('1_word') tasks; else a task is exact-match when every output has at most "
        "`exact_match_max_words` words."))
    exact_match_max_words: int = Field(1, gt=0)
    predictions: NIPredictions = NIPredictions()
    quota_multiplier: float = Field(1.0, gt=0.0, description="Scales the exact-match quota table (upstream 1.0).")
    rouge_low_keep: float = Field(0.8, ge=0.0, le=1.0, description="Share kept of ROUGE-L < 0.2.")
    rouge_band_keep: float = Field(0.2, ge=0.0, le=1.0, description="Share kept of each 0.1 band in [0.2, 0.8).")
    generation_max_input_words: int = Field(1100, gt=0)


SourceConfig = Annotated[
    MathInstructSource | LimaSource | PlatypusSource | QuacSource | OpenBookQASource | CnnDailyMailSource
    | InstructionRowsSource
    | NaturalInstructionsSource,
    Field(discriminator="kind"),
]


class RebuildData(Section):
    """Rebuild the mix from its sources, then filter, template, shuffle and split with one seed."""

    sources: tuple[SourceConfig, ...] = Field(min_length=1)
    compare_with: str | None = Field(None, description=(
        "Local folder holding the published train/eval files: report rows in common with the rebuild."))

    @model_validator(mode="after")
    def _unique_names(self) -> RebuildData:
        names = [s.name for s in self.sources]
        if len(names) != len(set(names)):
            raise ValueError(f"source names must be unique, got {names}")
        return self


class Benchmark(Section):
    """One evaluation set of the challenge's HELM run specs, read for n-gram overlap."""

    name: str = Field(min_length=1)
    origin: HubOrPath
    text_fields: tuple[str, ...] = Field(min_length=1, description=(
        "Fields whose text is checked; a list or a {choices: [...]}-style mapping contributes every string."))


class ContaminationConfig(Section):
    """Which evaluation sets training rows are checked against, and how (no benchmarks: no check)."""

    ngram: int = Field(13, gt=0, description="Words per n-gram, on lower-cased text stripped of punctuation.")
    benchmarks: tuple[Benchmark, ...] = ()


class DataConfig(Section):
    mode: Literal["published", "rebuild"]
    published: PublishedData | None = None
    rebuild: RebuildData | None = None
    seed: int = Field(description="Seed of every shuffle; two runs with the same seed give identical files.")
    eval_fraction: float = Field(0.02, gt=0.0, lt=1.0, description="Share of rows held out (98/2 upstream).")
    min_input_words: int = Field(4, ge=0, description="Drop rows whose input has this many words or fewer.")
    dedupe_inputs: bool = Field(True, description="Drop rows whose input was already seen (exact match).")
    drop_empty_output: bool = Field(False, description=(
        "Upstream's `len(output.split(' ')) < 1` never fires, so empty outputs were kept; true drops them."))
    decontaminate: Literal["report", "drop"] = Field("report", description=(
        "report: count overlaps, keep every row (faithful to the winning data); drop: remove overlapping rows."))
    contamination: ContaminationConfig = ContaminationConfig()

    @model_validator(mode="after")
    def _mode_section(self) -> DataConfig:
        if self.mode == "published" and self.published is None:
            raise ValueError("mode 'published' needs a 'published' section")
        if self.mode == "rebuild" and self.rebuild is None:
            raise ValueError("mode 'rebuild' needs a 'rebuild' section")
        return self
