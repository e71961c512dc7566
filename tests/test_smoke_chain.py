"""`invoke smoke`, the README's first Quick start command, end to end (the session fixture runs it)."""

import json

from birbal.verify import verify_run


def test_every_stage_complete_with_a_falling_loss(smoke_run):
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    stages = manifest["stages"]
    assert set(stages) == {"prepare-data", "train", "export", "serve", "evaluate"}
    assert all(s["status"] == "complete" for s in stages.values())
    train = stages["train"]["details"]
    assert train["final_train_loss"] < train["first_train_loss"] - 2.0
    assert train["eval_history"][-1]["eval_loss"] < train["eval_history"][0]["eval_loss"]
    assert (smoke_run / "export" / "merged" / "model.safetensors").is_file()
    assert stages["export"]["details"]["merge_max_logit_diff"] < 1e-3


def test_server_answered_and_logprobs_add_up(smoke_run):
    check = json.loads((smoke_run / "evaluate" / "api_check.json").read_text())
    assert check["problems"] == [] and check["generated_tokens"] > 0
    assert abs(check["token_logprob_sum"] - check["logprob"]) < 1e-4
    served = json.loads((smoke_run / "serve" / "stage.json").read_text())["details"]["requests"]
    for path in ("/process 200", "/tokenize 200", "/decode 200"):
        assert served.get(path, 0) > 0, served


def test_the_run_says_where_it_is_and_verifies(smoke_run):
    out = (smoke_run / "invoke-smoke.out").read_text()
    assert f"run directory: {smoke_run}" in out and "report.md" in out
    assert (smoke_run / "report.md").is_file() and (smoke_run / "train" / "loss.png").is_file()
    assert verify_run(smoke_run) == []
    # transformers 5.24 renamed the checkpointing calls: no stage's log warns that we (or peft) use the old names
    err = (smoke_run / "invoke-smoke.err").read_text()
    assert "gradient_checkpointing` is deprecated" not in err and "gradient_checkpointing_enable` is deprecated" not in err
    # nor does a checkpoint's save look the base up on the hub (peft's save_embedding_layers="auto")
    assert "Unable to fetch remote file" not in err and "Could not find a config file" not in err


def test_no_stage_of_the_tiny_profile_asks_the_network(smoke_run):
    """Every process of the chain ran with tests/netprobe: a lookup of any host but this one is logged there."""
    log = smoke_run.parent / "hosts-asked.log"
    assert not log.exists(), log.read_text()[:2000]
