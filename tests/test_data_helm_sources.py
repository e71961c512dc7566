"""QuAC, OpenBookQA ("openQA") and CNN/DailyMail built as HELM's scenario code builds them, on fixtures in each
source's exact schema, through the real loaders; where HELM's own code can run (the client-only HELM venv of
.ci/run, BIRBAL_HELM_PYTHON), its scenario classes are the oracle."""

from __future__ import annotations

import http.server
import json
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

from birbal.config.data import (
    CnnDailyMailSource,
    HubOrPath,
    OpenBookQASource,
    QuacOrigin,
    QuacSource,
    UrlFile,
)
from birbal.data.loaders import (
    helm_clean,
    load_cnn_dailymail,
    load_openbookqa,
    load_quac,
    quac_instance,
)
from birbal.data.sources import PACKAGE_ROOT, fetch_url
from birbal.errors import DataError
from birbal.fsutil import sha256_file

SOURCES = PACKAGE_ROOT / "fixtures" / "sources"
QUAC = SOURCES / "quac" / "train_v0.2.json"
OBQA = SOURCES / "openbookqa" / "train.jsonl"
CNN = SOURCES / "cnn_dailymail" / "train.jsonl"
HELM_PYTHON = os.environ.get("BIRBAL_TEST_HELM_PYTHON") or os.environ.get("BIRBAL_HELM_PYTHON")


def quac(**kw) -> QuacSource:
    return QuacSource(name="quac", kind="quac", origin=QuacOrigin(path=str(QUAC)), **kw)


def helm(code: str) -> object:
    """Run `code` with HELM's own package (crfm-helm 0.5.16) and return what it printed as JSON."""
    if not HELM_PYTHON or not Path(HELM_PYTHON).exists():
        pytest.skip("BIRBAL_HELM_PYTHON (crfm-helm installed client-only, as .ci/run builds it) is not set")
    done = subprocess.run([HELM_PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


# --- QuAC ---------------------------------------------------------------------------------------------------------

def test_quac_prompt_is_helms_format_with_its_seeded_stopping_point(tmp_path):
    rows, report = load_quac(quac(), 0, tmp_path)
    assert report.steps == {"read": 3, "length": 3} and report.extra["sha256"] == sha256_file(QUAC)
    data = json.loads(QUAC.read_text())["data"]
    rng = random.Random(0)
    for row, sample in zip(rows, data, strict=True):
        qas = sample["paragraphs"][0]["qas"]
        k = rng.randint(3, len(qas)) - 1
        assert row["input"].startswith(f"Title: {sample['title']}\n\nBackground: {sample['background']}\n\n"
                                       f"Section: {sample['section_title']}\nPassage: ")
        assert " CANNOTANSWER" not in row["input"].split("\n\n")[3]
        assert row["input"].endswith(f"Question: {qas[k]['question']}")
        # HELM's history is range(k - 1): the pair just before the asked question is not shown
        assert f"Question: {qas[k - 1]['question']}\n" not in row["input"]
        assert row["input"].count("\nAnswer: ") == k - 1
        assert row["output"] == qas[k]["answers"][0]["text"] and row["instruction"] == ""


def test_quac_matches_helms_own_scenario_code(tmp_path):
    """HELM's QuACScenario.get_split_instances on the same file, after its random.seed(0): same prompts, same
    first references, in the same order."""
    expected = helm(
        "import json, random\n"
        "from helm.benchmark.scenarios.quac_scenario import QuACScenario\n"
        "random.seed(0)\n"
        f"instances = QuACScenario().get_split_instances({str(QUAC)!r}, split='train')\n"
        "print(json.dumps([[i.input.text, [r.output.text for r in i.references]] for i in instances]))\n")
    rows, _ = load_quac(quac(), 0, tmp_path)
    assert [[r["input"], r["output"]] for r in rows] == [[text, refs[0]] for text, refs in expected]


def test_quac_no_answer_aliases_and_bad_dialogues(tmp_path):
    sample = json.loads(QUAC.read_text())["data"][2]  # its last two answers are CANNOTANSWER
    rng = random.Random(5)
    seen = set()
    for _ in range(40):
        prompt, answers = quac_instance(sample, rng, 1, "quac")
        seen.add(answers[0])
        if answers[0] == "CANNOTANSWER":
            assert answers == ["CANNOTANSWER", "Not enough information", "Cannot answer", "Do not know"]
    assert "CANNOTANSWER" in seen
    short = json.loads(json.dumps(sample))
    short["paragraphs"][0]["qas"] = short["paragraphs"][0]["qas"][:2]
    with pytest.raises(DataError, match="2 questions; HELM draws randint"):
        quac_instance(short, rng, 7, "quac")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"title": "t", "background": "b", "section_title": "s",
                                         "paragraphs": [{"context": "no marker", "qas": []}]}]}))
    with pytest.raises(DataError, match=r"source 'quac': QuAC dialogue 1: the context does not end in"):
        load_quac(QuacSource(name="quac", kind="quac", origin=QuacOrigin(path=str(bad))), 0, tmp_path)


def test_quac_sample_is_a_seeded_recipe_value(tmp_path):
    first, report = load_quac(quac(sample=2), 1, tmp_path)
    again, _ = load_quac(quac(sample=2), 1, tmp_path)
    assert len(first) == 2 and first == again and report.steps["sample"] == 2


def test_quac_from_its_url_needs_a_sha256_and_checks_it(tmp_path):
    """The URL path through a real HTTP server on localhost: refused without a pin, refused on a wrong one,
    fetched once and cached under its digest on the right one."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "train_v0.2.json").write_bytes(QUAC.read_bytes())
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/train_v0.2.json"
    try:
        unpinned = QuacSource(name="quac", kind="quac", origin=QuacOrigin(file=UrlFile(url=url, sha256_note="none")))
        with pytest.raises(DataError, match=r"source 'quac': .*train_v0.2.json has no pinned sha256 \(none\)"):
            load_quac(unpinned, 0, tmp_path / "cache")
        with pytest.raises(DataError, match="does not match the pinned"):
            fetch_url(UrlFile(url=url, sha256="0" * 64), tmp_path / "cache", "quac")
        assert not list((tmp_path / "cache").rglob("train_v0.2.json"))  # a bad download is never cached
        digest = sha256_file(QUAC)
        pinned = QuacSource(name="quac", kind="quac", origin=QuacOrigin(file=UrlFile(url=url, sha256=digest)))
        rows, report = load_quac(pinned, 0, tmp_path / "cache")
        assert report.origin == url and len(rows) == 3
        assert (tmp_path / "cache" / "urls" / digest / "train_v0.2.json").is_file()
        (served / "train_v0.2.json").unlink()  # cached: no second fetch
        assert load_quac(pinned, 0, tmp_path / "cache")[0] == rows
    finally:
        server.shutdown()


# --- OpenBookQA ---------------------------------------------------------------------------------------------------

def obqa(**kw) -> OpenBookQASource:
    return OpenBookQASource(name="openqa", kind="openbookqa", origin=HubOrPath(path=str(OBQA)), **kw)


def test_openbookqa_rows_give_the_correct_completion(tmp_path):
    rows, report = load_openbookqa(obqa(), 0, tmp_path)
    assert report.steps == {"read": 6, "length": 6}
    first = rows[0]
    assert first["input"] == ("Question: The sun is responsible for\nA. puppies learning new tricks\n"
                              "B. children growing up and getting old\nC. flowers wilting in a vase\n"
                              "D. plants sprouting, blooming and wilting")
    assert first["output"] == "plants sprouting, blooming and wilting"
    assert first["instruction"].startswith("You are given an incomplete sentence along with a few reference")
    letters, _ = load_openbookqa(obqa(answer="letter"), 0, tmp_path)
    assert [r["output"] for r in letters] == ["D", "C", "B", "A", "C", "C"]


def test_openbookqa_matches_helms_json_to_instance(tmp_path):
    """HELM's OpenBookQA.json_to_instance on the AI2 file's rows (its own source): the same correct answer."""
    ai2 = []
    for line in OBQA.read_text().splitlines():
        row = json.loads(line)
        ai2.append({"id": row["id"], "answerKey": row["answerKey"], "question": {
            "stem": row["question_stem"], "choices": [{"text": t, "label": lab} for t, lab in
                                                      zip(row["choices"]["text"], row["choices"]["label"],
                                                          strict=True)]}})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ai2))
    expected = helm(
        "import json\n"
        "from helm.benchmark.scenarios.commonsense_scenario import OpenBookQA\n"
        "from helm.benchmark.scenarios.scenario import CORRECT_TAG\n"
        f"rows = [json.loads(l) for l in open({str(path)!r})]\n"
        "out = []\n"
        "for r in rows:\n"
        "    inst = OpenBookQA.json_to_instance(r, 'train')\n"
        "    out.append([inst.input.text, [x.output.text for x in inst.references if CORRECT_TAG in x.tags]])\n"
        "print(json.dumps(out))\n")
    from_ai2, _ = load_openbookqa(OpenBookQASource(name="openqa", kind="openbookqa", origin=HubOrPath(path=str(path))),
                                  0, tmp_path)
    from_hub, _ = load_openbookqa(obqa(), 0, tmp_path)
    assert from_ai2 == from_hub
    assert [r["output"] for r in from_hub] == [correct[0] for _, correct in expected]
    assert [r["input"].split("\n")[0] for r in from_hub] == [f"Question: {stem}" for stem, _ in expected]


def test_openbookqa_bad_rows_stop_with_the_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    row = json.loads(OBQA.read_text().splitlines()[0])
    row["choices"]["label"] = ["A", "B", "C", "E"]
    bad.write_text(json.dumps({"id": "x"}) + "\n")
    with pytest.raises(DataError, match=r"source 'openqa': OpenBookQA row 1: expected \{question_stem"):
        load_openbookqa(OpenBookQASource(name="openqa", kind="openbookqa", origin=HubOrPath(path=str(bad))), 0,
                        tmp_path)
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="4 choices labelled A-D"):
        load_openbookqa(OpenBookQASource(name="openqa", kind="openbookqa", origin=HubOrPath(path=str(bad))), 0,
                        tmp_path)


# --- CNN/DailyMail ------------------------------------------------------------------------------------------------

def cnn(**kw) -> CnnDailyMailSource:
    return CnnDailyMailSource(name="cnn", kind="cnn_dailymail", origin=HubOrPath(path=str(CNN)), **kw)


def test_cnn_dailymail_follows_helms_train_filter(tmp_path):
    rows, report = load_cnn_dailymail(cnn(), 0, tmp_path)
    # 8 articles: one over 150 words, one under 50 (HELM's run spec window after the 512-word cut)
    assert report.steps == {"read": 8, "helm_length_window": 6, "length": 6}
    assert all("\n" not in r["input"] and "\n" not in r["output"] for r in rows)
    assert rows[0]["output"].startswith("The city council approved a new cycling lane network") and \
        " . Re" in rows[0]["output"]  # the highlights' newlines became spaces
    assert rows[0]["instruction"] == "Summarize the above article in 3 sentences."
    unbounded, report = load_cnn_dailymail(cnn(sampling_min_length=None, sampling_max_length=None), 0, tmp_path)
    assert report.steps["helm_length_window"] == 8
    cut = next(r for r in unbounded if r["input"].startswith("By . Staff"))
    assert len(cut["input"].split()) == 294 and "\n" not in cut["input"]  # under the 512-word cut: whole
    short, _ = load_cnn_dailymail(cnn(doc_max_length=20, sampling_min_length=None, sampling_max_length=None), 0,
                                  tmp_path)
    assert all(len(r["input"].split()) <= 20 for r in short)


def test_cnn_dailymail_matches_helms_summarization_scenario(tmp_path):
    """HELM's SummarizationScenario.get_instances with its run spec's arguments, on the same rows (handed to it
    in place of its pickle): the same train articles and summaries."""
    rows = [json.loads(line) for line in CNN.read_text().splitlines()]
    expected = helm(
        "import json\n"
        "from helm.benchmark.scenarios.summarization_scenario import SummarizationScenario\n"
        f"rows = [json.loads(l) for l in open({str(CNN)!r})]\n"
        "s = SummarizationScenario('cnn-dm', sampling_min_length=50, sampling_max_length=150, doc_max_length=512)\n"
        "s._load_dataset = lambda name, path: ({'train': rows, 'validation': [], 'test': []}, 'article', "
        "'highlights')\n"
        "print(json.dumps([[i.input.text, i.references[0].output.text] for i in s.get_instances('unused')]))\n")
    ours, _ = load_cnn_dailymail(cnn(), 0, tmp_path)
    assert [[r["input"], r["output"]] for r in ours] == expected
    assert helm_clean(rows[0]["article"]) == ours[0]["input"]


def test_cnn_dailymail_sample_is_seeded(tmp_path):
    first, report = load_cnn_dailymail(cnn(sample=3), 1, tmp_path)
    again, _ = load_cnn_dailymail(cnn(sample=3), 1, tmp_path)
    other, _ = load_cnn_dailymail(cnn(sample=3), 2, tmp_path)
    assert len(first) == 3 and first == again and report.steps["sample"] == 3
    assert [r["input"] for r in first] != [r["input"] for r in other]
