"""The prepare-data stage end to end on fixtures: determinism, manifest, published mode, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from birbal.config import load_recipe
from birbal.data.prepare import prepare_data
from birbal.errors import DataError
from birbal.fsutil import sha256_file
from birbal.models import load_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    recipe = load_recipe("smoke")
    return load_tokenizer(recipe.model.tokenizer, tmp_path_factory.mktemp("tok"))


def run(tmp_path: Path, tokenizer, overrides=(), name="a", profile="smoke"):
    out = tmp_path / name / "data"
    manifest = prepare_data(load_recipe(profile, list(overrides)), out, tmp_path / name / "cache", tokenizer)
    return out, manifest


def test_smoke_rebuild_is_byte_identical_across_runs(tmp_path, tokenizer):
    first, manifest = run(tmp_path, tokenizer, name="a")
    second, _ = run(tmp_path, tokenizer, name="b")
    for name in ("train.jsonl", "eval.jsonl", "contamination.json", "manifest.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other, _ = run(tmp_path, tokenizer, ["data.seed=7"], name="c")
    assert (other / "train.jsonl").read_bytes() != (first / "train.jsonl").read_bytes()
    # enough learnable rows for the smoke chain, every source represented
    assert manifest["rows"]["train"] >= 150
    sources = manifest["provenance"]["sources"]
    assert set(sources) == {"quac", "openqa", "cnn_dailymail", "mathinstruct", "platypus", "natural_instructions",
                            "lima", "fixture-mix"}
    assert all(info["rows_after_mix_filters"] > 0 for info in sources.values())
    assert sum(info.get("rows_train", 0) for info in sources.values()) == manifest["rows"]["train"]


def test_manifest_contents(tmp_path, tokenizer):
    out, manifest = run(tmp_path, tokenizer)
    assert manifest["files"]["train.jsonl"] == sha256_file(out / "train.jsonl")
    assert json.loads((out / "manifest.json").read_text()) == manifest
    tokens = manifest["tokens"]["train"]
    assert tokens["rows"] == manifest["rows"]["train"] and sum(tokens["histogram"].values()) == tokens["rows"]
    window = str(load_recipe("smoke").train.sequence_len)
    assert set(tokens["share_over_window"]) == {"8192", window}
    assert manifest["projected_tokens_per_epoch"] == tokens["total_tokens"] > 0
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"question", "answer", "source"} and rows[0]["question"].endswith("### Response:\n")
    assert manifest["contamination"]["rows_flagged"] == {"mathinstruct": 1}
    math = manifest["provenance"]["sources"]["mathinstruct"]
    assert math["origin"] == "package:fixtures/sources/mathinstruct/MathInstruct.jsonl" and "sha256" in math


def test_drop_mode_removes_contaminated_rows(tmp_path, tokenizer):
    _, kept = run(tmp_path, tokenizer, name="report")
    _, dropped = run(tmp_path, tokenizer, ["data.decontaminate=drop"], name="drop")
    assert dropped["contamination"]["rows_dropped"] == 1
    assert sum(dropped["rows"].values()) == sum(kept["rows"].values()) - 1


def write_published(folder: Path, train: list[dict], evaluation: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "train_dataset.json").write_text(json.dumps(train, indent=1))
    (folder / "eval_dataset.json").write_text(json.dumps(evaluation, indent=1))


def test_published_from_local_folder_and_checks(tmp_path, tokenizer):
    rows = [{"question": f"### Input:\nquestion number {i} is here\n\n### Response:\n", "answer": f"a{i}"}
            for i in range(20)]
    folder = tmp_path / "published"
    write_published(folder, rows[:18], rows[18:])
    base = ["data.mode=published", f"data.published.name_or_path={folder}"]
    out, manifest = run(tmp_path, tokenizer, base, name="ok")
    assert manifest["rows"] == {"train": 18, "eval": 2}
    assert manifest["provenance"]["files"]["train"]["sha256"] == sha256_file(folder / "train_dataset.json")
    assert json.loads((out / "train.jsonl").read_text().splitlines()[0])["source"] == "published"
    good_hash = sha256_file(folder / "eval_dataset.json")
    run(tmp_path, tokenizer, [*base, "data.published.expected_rows={train: 18, eval: 2}",
                              f"data.published.sha256={{train: {manifest['provenance']['files']['train']['sha256']}, "
                              f"eval: {good_hash}}}"], name="pinned")
    with pytest.raises(DataError, match=r"has 18 rows, expected 17 \(data.published.expected_rows.train\)"):
        run(tmp_path, tokenizer, [*base, "data.published.expected_rows={train: 17, eval: 2}"], name="ok")
    # the failed re-run leaves no manifest (so nothing is marked complete) and no partial files
    assert not (out / "manifest.json").exists() and not list(out.glob(".*"))
    with pytest.raises(DataError, match=r"sha256 .*expected 0+ \(data.published.sha256.train\)"):
        run(tmp_path, tokenizer, [*base, f"data.published.sha256={{train: '{'0' * 64}', eval: '{'0' * 64}'}}"],
            name="hash")


def test_published_wrong_schema(tmp_path, tokenizer):
    folder = tmp_path / "published"
    write_published(folder, [{"prompt": "x", "answer": "y"}], [])
    with pytest.raises(DataError, match=r"row 1 lacks or mistypes field\(s\) question"):
        run(tmp_path, tokenizer, ["data.mode=published", f"data.published.name_or_path={folder}"])


def test_closeness_to_a_published_copy(tmp_path, tokenizer):
    out, manifest = run(tmp_path, tokenizer, name="rebuild")
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    folder = tmp_path / "published"
    write_published(folder, [{"question": r["question"], "answer": r["answer"]} for r in rows[:30]],
                    [{"question": "### Input:\nnot in the rebuild at all\n\n### Response:\n", "answer": "x"}])
    _, compared = run(tmp_path, tokenizer, [f"data.rebuild.compare_with={folder}"], name="compared")
    close = compared["provenance"]["closeness"]
    assert close["published_rows"] == 31 and close["rows_in_common"] == 30
    by_source = {s: v["same_question_and_answer"] for s, v in close["per_source"].items()}
    expected: dict[str, int] = {}
    for r in rows[:30]:
        expected[r["source"]] = expected.get(r["source"], 0) + 1
    assert {s: n for s, n in by_source.items() if n} == expected


def test_published_mode_fails_cleanly_without_the_hub(tmp_path):
    code = ("from pathlib import Path\nfrom birbal.config import load_recipe\n"
            "from birbal.data.prepare import prepare_data\n"
            "prepare_data(load_recipe('birbal-4090'), Path('out'), Path('cache'), tokenizer=None)\n")
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("birbal.errors.DataError: could not fetch train_dataset.json of dataset "
                           "upaya07/NeurIPS-LLM-data at revision 5d3ce1ca586ebe629847b7c81bfb7fa6373b9dbc")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_4090_profile_data_section_pins_or_explains_every_hub_load():
    data = load_recipe("birbal-4090").data
    assert data.mode == "published" and data.decontaminate == "report" and data.eval_fraction == 0.02
    origins = [s.origin for s in data.rebuild.sources if hasattr(s, "origin") and s.kind != "quac"]
    origins += [b.origin for b in data.contamination.benchmarks]
    quac = next(s for s in data.rebuild.sources if s.kind == "quac").origin.file
    assert quac.url == "https://s3.amazonaws.com/my89public/quac/train_v0.2.json"  # HELM's quac_scenario.py
    # ParlAI's parlai/tasks/quac/build.py (facebookresearch/ParlAI 7a206821) pins this digest for the same URL
    assert quac.sha256 == "ff5cca5a2e4b4d1cb5b5ced68b9fce88394ef6d93117426d6d4baafbcc05c56a"
    for origin in origins:
        assert origin.path or origin.revision or origin.revision_note, origin
    math = next(s for s in data.rebuild.sources if s.kind == "mathinstruct")
    assert math.lowercase_prob == 0.3 and math.cap == 50_000
    assert next(s for s in data.rebuild.sources if s.kind == "platypus").length_rule == "none"
