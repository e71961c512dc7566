"""The container contract: what `invoke reproduce --runtime docker` runs, replayed as `docker run` would run it.

No Docker engine exists here, so tests/container_replay.py replays each image from its Dockerfile (parsed, not
restated: ENV, SHELL, USER, WORKDIR, ENTRYPOINT, and the COPY/RUN instructions that install the lock and the
project, executed literally) and each `docker run` from the argv that birbal.containers writes for `invoke
reproduce` (mounts at their container paths, `--user` a uid:gid with no passwd entry, HOME=/, cwd = WORKDIR).
Its docstring lists everything that differs from a real container.

The interpreter and the wheels: Python 3.12 (BIRBAL_IMAGE_PYTHON; Ubuntu 24.04's python3.12 in the image) and the
image's own lock, installed as-is with `pip install --require-hashes --no-deps -r requirements/<image>.txt`:
torch 2.10.0's CUDA build and its nvidia-* and triton wheels included. That was a choice, measured: PyPI has no
x86_64 CPU build of torch 2.10.0 (its x86_64 wheels are the CUDA 12.8 build, 916 MB; only aarch64 is CPU-only) and
PyTorch's CPU index is not reachable from here, so "the lock minus the CUDA wheels" would have meant a different
torch build than the image's, and item 2 of issue 13 (getpass at import) is about that very build. The CUDA build
imports and runs on a CPU; what it cannot test is the GPU.

The layers (tests/container_replay.py): one cached layer per dependency RUN, named by the chain of instructions up
to it (COPYs by content, RUNs by text, the ENV in force, the interpreter), so two images share a layer only where
Docker's build cache would share it (FROM aside: the host stands in for every base). Dockerfile.helm repeats
Dockerfile.serve up to the /opt/venv install, so all three images replay on one 7.7 GB /opt/venv layer and the helm
image adds its 7.9 GB /opt/helm-venv above it: each image's lock is still installed by that image's own RUN, on
top of exactly the files that RUN sees in the image. Not done, because unfaithful: a CPU torch in place of the
locks' CUDA build (PyPI has no x86_64 CPU build of 2.10.0 and item 2 is about that build), or /opt/helm-venv
reusing /opt/venv's torch (the helm image carries its own copy; a .pth or symlink would be a different image).
Measured on this 2-core machine, cold (an empty BIRBAL_CONTAINER_CACHE, PyPI at full speed): /opt/venv 140 s,
/opt/helm-venv 179 s (5.3 min in all; it was ~22 min before, when the helm layer rebuilt /opt/venv). .ci/run builds
them in the background while the rest of the suite runs; these tests run last (tests/conftest.py) and wait on each
layer's lock. A whole cold .ci/run (fresh clone, empty layer cache) measured 1245 s, but with two other test and
benchmark runs on the same 2 cores (load 4-5; the layers then took 340 s + 423 s): the warm .ci/run right after it,
under lighter load, took 682 s. Warm, the layers are found in 0.1 s; this file's tests take ~51 s.

The open suite (test_the_smoke_chain_passes_through_the_containers): evaluate runs helm-run in the replayed helm
image against the chain's own server, with `--set evaluate.helm_run_specs=run_specs_offline_check.conf` and HELM's
GSM8K scenario cache filled from the project's fixture in the run dir, the only differences from what
`invoke reproduce --runtime docker --profile birbal-4090` runs (HELM's scenario downloads are unreachable here).

Skipped (not failed) where the replay cannot work: not root, no unshare, or no Python 3.12.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import container_replay as replay  # noqa: E402

from birbal import containers  # noqa: E402

NO_PASSWD_UID = 43210
# The contract is about the containers, not learning: a few optimizer steps keep CI's added time small. They reach
# the run dir's recipe as `--set` arguments of every `docker run`, as a judge's overrides would.
CHAIN_OVERRIDES = ["--set", "train.max_steps=4", "--set", "train.eval_steps=2", "--set", "train.save_steps=2"]
# evaluate runs the open suite, birbal-4090's: helm-run inside the helm image against the chain's server, then
# helm-summarize, our summary and the report. Only its run spec list differs from the challenge's (a recipe value,
# evaluate.helm_run_specs): two of crfm-helm's run specs that need no download, HELM's in-code simple_mcqa and the
# challenge's own gsm, whose data HELM reads from its scenarios cache in the run dir, filled here from the project's
# GSM8K fixture (GSM8K's jsonl schema) as a judge without internet would fill it. Before it, the smoke profile's own
# quick suite runs in the same image (HELM's client classes from /opt/helm-venv).
OPEN_SUITE_OVERRIDES = ["--set", "evaluate.suite=open", "--set", "evaluate.helm_run_specs=run_specs_offline_check.conf"]
GSM8K_FIXTURE = Path(containers.__file__).parent / "fixtures" / "sources" / "benchmarks" / "gsm8k_test.jsonl"

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="the replay needs root (namespaces)"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is missing"),
    pytest.mark.skipif(not replay.IMAGE_PYTHON.is_file(), reason=f"no image interpreter at {replay.IMAGE_PYTHON}"),
]


def _no_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return False
    except KeyError:
        return True


def test_the_dockerfiles_say_what_the_replay_assumes():
    for name in containers.DOCKERFILES:
        image = replay.read_image(name)
        assert image.entrypoint == ["birbal"] and image.workdir == containers.CONTAINER_RUNS
        assert image.env["HF_HOME"] == containers.CONTAINER_HUB_CACHE
        uid, gid = image.uid_gid
        assert uid != 0 and gid != 0
        # The lock layer comes before the source, and the only skipped RUNs are apt's and useradd's.
        deps, project = replay._split_layers(image)
        assert any(i.kind == "COPY" and i.value.startswith(f"requirements/{name}.txt") for i in deps)
        assert [i.value.split()[0] for i in image.instructions if replay._skipped(i)] == ["rm", "useradd"]
    # One /opt/venv layer for the three images (Dockerfile.helm's chain up to it is Dockerfile.serve's); the helm
    # image adds its /opt/helm-venv on top.
    layers = {name: replay.layer_paths(replay.read_image(name)) for name in containers.DOCKERFILES}
    assert layers["train"] == layers["serve"] == layers["helm"][:1] and len(layers["helm"]) == 2


def test_helm_run_in_the_helm_image_gets_a_writable_nltk_folder(tmp_path):
    """HELM's metrics download NLTK's punkt_tab into NLTK's default folder; as uid 43210 with HOME=/ in the helm
    image none is writable, so even online it failed. The evaluate stage's environment for helm-run names one in
    the run dir (open_suite.helm_environment)."""
    from birbal.evaluate.open_suite import helm_environment

    built = replay.build("helm", tmp_path / "layers")
    run_dir = tmp_path / "runs" / "smoke"
    run_dir.mkdir(parents=True)
    owner = "mode=755,uid={},gid={}".format(*built.image.uid_gid)
    mounts = [built.venv_mount(), replay.Mount("/tmp", None, read_only=False, tmpfs_options="mode=1777"),
              replay.Mount("/runs", None, read_only=False, tmpfs_options=owner),
              replay.Mount("/runs/smoke", str(run_dir), read_only=False)]
    image_env = {**built.image.env, "HOME": "/"}
    probe = ("import os, nltk.downloader; d = nltk.downloader.Downloader().default_download_dir(); "
             "os.makedirs(d, exist_ok=True); print(d)")
    helm_python = built.image.env["BIRBAL_HELM_PYTHON"]

    def nltk_folder(env: dict[str, str]) -> subprocess.CompletedProcess:
        return replay.run_in_private_root(mounts, [helm_python, "-c", probe], env=env, cwd=built.image.workdir,
                                          uid_gid=(NO_PASSWD_UID, NO_PASSWD_UID), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, timeout=300)

    bare = nltk_folder(image_env)
    assert bare.returncode != 0 and "/nltk_data" in bare.stdout, bare.stdout[-2000:]
    # evaluate builds it inside the container; here the same function, for the container's paths
    env = {k: v for k, v in helm_environment("http://127.0.0.1:8080", Path("/runs/smoke/evaluate/helm"),
                                             image_env).items()}
    (run_dir / "evaluate" / "helm" / "nltk_data").mkdir(parents=True)  # what helm_environment made, host side
    fixed = nltk_folder(env)
    assert fixed.returncode == 0, fixed.stdout[-2000:]
    assert fixed.stdout.split()[-1] == "/runs/smoke/evaluate/helm/nltk_data"


def test_parse_run_reads_what_containers_writes():
    argv = containers.reproduce_stage_command("serve", profile="smoke", run_dir="/srv/runs/r1", hub_cache="/hf",
                                              user="5:6", version="0.1.0", revision=None)
    spec = replay.parse_run(argv)
    assert spec.user == "5:6" and spec.detach and spec.publish == "127.0.0.1:8080:8080"
    assert ("/srv/runs/r1", "/runs/r1") in spec.mounts and ("/hf", "/cache/huggingface") in spec.mounts
    assert spec.args[:3] == ["serve", "--profile", "smoke"] and spec.args[-4:] == ["--host", "0.0.0.0", "--port",
                                                                                   "8080"]


def test_torch_2_10_needs_a_login_name_and_the_cli_gives_it_one(tmp_path):
    """Issue 13 item 2, in the replayed train image as uid 43210 with HOME=/: the image's own torch fails at import
    (getpass.getuser() inside inductor's code cache), and birbal's entrypoint names the uid before torch loads."""
    assert _no_passwd_entry(NO_PASSWD_UID)
    built = replay.build("train", tmp_path / "layers")
    owner = "mode=755,uid={},gid={}".format(*built.image.uid_gid)
    mounts = [built.venv_mount(), replay.Mount("/tmp", None, read_only=False, tmpfs_options="mode=1777"),
              replay.Mount("/runs", None, read_only=False, tmpfs_options=owner)]
    env = {**built.image.env, "HOME": "/"}

    def python(code: str) -> subprocess.CompletedProcess:
        return replay.run_in_private_root(mounts, ["python", "-c", code], env=env, cwd=built.image.workdir,
                                          uid_gid=(NO_PASSWD_UID, NO_PASSWD_UID), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, timeout=300)

    bare = python("import torch; assert torch.__version__.startswith('2.10'), torch.__version__; "
                  "import torch._inductor.codecache")
    assert bare.returncode != 0 and "getpwuid(): uid not found" in bare.stdout, bare.stdout[-2000:]
    fixed = python("from birbal.cli import name_a_passwdless_uid; print(name_a_passwdless_uid()); "
                   "import torch._dynamo, torch._inductor.codecache; import os; print(os.environ['HOME'])")
    assert fixed.returncode == 0, fixed.stdout[-2000:]
    assert fixed.stdout.split() == [f"uid_{NO_PASSWD_UID}", "/"]


def test_the_smoke_chain_passes_through_the_containers(tmp_path):
    """prepare-data -> train -> export -> serve -> evaluate -> report, each stage the `docker run` that invoke runs,
    as uid 43210 (no passwd entry, HOME=/), with the lock's torch 2.10 (issue 13 items 1 and 2 failed here)."""
    assert _no_passwd_entry(NO_PASSWD_UID), f"uid {NO_PASSWD_UID} has a passwd entry here; pick another"
    started = time.monotonic()
    for name in containers.DOCKERFILES:  # downloads on a cache miss, so outside the chain's private network
        replay.dependency_layer(replay.read_image(name))
    layers_s = time.monotonic() - started
    profile = "smoke"
    run_dir = tmp_path / "runs" / profile  # named like the profile, as `invoke reproduce` names it
    hub_cache = tmp_path / "huggingface"
    for folder in (run_dir, hub_cache):
        folder.mkdir(parents=True)
    scenarios = run_dir / "evaluate" / "helm" / "benchmark_output" / "scenarios" / "gsm"
    scenarios.mkdir(parents=True)
    for split in ("train", "test"):  # crfm-helm 0.5.16's GSM8KScenario: <scenarios>/gsm/gsm_data_<split>
        shutil.copyfile(GSM8K_FIXTURE, scenarios / f"gsm_data_{split}")
    out = tmp_path / "chain.json"
    command = ["unshare", "--net", sys.executable, str(Path(replay.__file__)), "chain", "--run-dir", str(run_dir),
               "--hub-cache", str(hub_cache), "--scratch", str(tmp_path / "layers"), "--json", str(out),
               "--uid", str(NO_PASSWD_UID), "--profile", profile, *CHAIN_OVERRIDES, *OPEN_SUITE_OVERRIDES,
               "--first-evaluate", "--suite quick"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    stages = [s["stage"] for s in result["stages"]]
    failed = [s for s in result["stages"] if s["returncode"] != 0 and s["stage"] != "serve"]
    assert not failed, f"{failed[0]['stage']} exited {failed[0]['returncode']}:\n{failed[0]['log_tail']}"
    assert stages == ["prepare-data", "train", "export", "serve", "evaluate-first", "evaluate", "report"], result
    # The open suite went through helm-run and helm-summarize in the helm image, and our summary read HELM's output.
    summary = json.loads((run_dir / "evaluate" / "summary.json").read_text())
    assert summary["suite"] == "open" and summary["client"] == "helm-run", summary
    assert summary["helm_run_exit"] == 0 and summary["helm_summarize_exit"] == 0 and summary["failed_runs"] == []
    assert summary["command"][0] == "helm-run" and "run_specs_offline_check.conf" in summary["command"]
    assert summary["runs"] == 2 and summary["scenarios"] == ["gsm", "simple_mcqa"], summary
    gsm = next(row for row in summary["rows"] if row["label"] == "GSM8K - EM")
    assert gsm["runs"] == 1 and gsm["metric"] == "exact_match_indicator" and 0.0 <= gsm["value"] <= 1.0, gsm
    assert [row["label"] for row in summary["rows"] if row["value"] is not None] == ["GSM8K - EM"]
    assert summary["score"]["scenarios_scored"] == ["GSM8K"]
    helm_dir = run_dir / "evaluate" / "helm"
    runs = sorted(p.name for p in (helm_dir / "benchmark_output" / "runs" / "birbal-open").iterdir() if p.is_dir())
    assert "gsm:model=neurips_local,max_eval_instances=2" in runs, runs
    assert (helm_dir / "nltk_data").is_dir()  # helm_environment's NLTK_DATA, made as the container's uid
    assert "GSM8K - EM" in (run_dir / "report.md").read_text()
    from birbal.rundir import STAGES, RunDir

    records = RunDir(run_dir)
    for stage in STAGES:
        assert records.is_complete(stage), (stage, records.record(stage))
    assert (run_dir / "report.md").is_file()
    # The server stopped on SIGTERM (docker stop) and recorded itself; its log says it ran as our uid.
    serve = next(s for s in result["stages"] if s["stage"] == "serve")
    assert serve["returncode"] == 0, serve["log_tail"]
    print(f"\ncontract chain: dependency layers {layers_s:.1f} s, chain {time.monotonic() - started - layers_s:.1f} s, "
          f"stages {[(s['stage'], s.get('seconds')) for s in result['stages']]}")
