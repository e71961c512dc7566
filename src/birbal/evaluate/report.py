"""`report.md` and its figures, built from the run directory alone: any part not run shows as "not run".

Reads: manifest.json (versions), data/manifest.json, data/contamination.json, train/stage.json and
train/metrics.jsonl, evaluate/summary.json and evaluate/stage.json, and a build manifest (build/manifest.json)
when the images were built. Writes: report.md and report/*.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from birbal.evaluate.compare import report_section
from birbal.evaluate.winners import WINNER_ID, winner_figures
from birbal.fsutil import atomic_write_text
from birbal.rundir import RunDir

NOT_RUN = "not run"
BUDGET_HOURS = 24.0  # the challenge's rule
MEMORY_GIB = 24.0  # an RTX 4090
BUILD_MANIFESTS = ("build/manifest.json", "build.json")


def _json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return rows
    for line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill at write time
        if isinstance(value, dict):
            rows.append(value)
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return NOT_RUN
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _plot_loss(metrics: list[dict[str, Any]], path: Path) -> bool:
    train = [(m["step"], m["loss"]) for m in metrics if m.get("event") == "train" and m.get("loss") is not None]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if m.get("event") == "eval" and m.get("eval_loss") is not None]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_scores(rows: list[dict[str, Any]], path: Path) -> bool:
    pairs = [(r["label"], r["value"], r.get("winners")) for r in rows if r.get("value") is not None]
    if not pairs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(pairs) + 1.5))
    ys = range(len(pairs))
    ax.barh([y + 0.2 for y in ys], [p[1] for p in pairs], height=0.4, label="this run")
    ax.barh([y - 0.2 for y in ys], [p[2] or 0.0 for p in pairs], height=0.4, label="winners (published)")
    ax.set_yticks(list(ys), [p[0] for p in pairs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _scores_section(summary: dict[str, Any] | None, record: dict[str, Any] | None, images: Path,
                    out: list[str]) -> None:
    out.append("## Scores next to the winners'\n")
    if record and record.get("status") == "failed":
        out.append(f"The evaluate stage failed: {record.get('error')}\n")
    if not summary:
        out.append(f"Evaluation: {NOT_RUN}. The winners' published figures ({WINNER_ID}):\n")
        out.append("| Figure | Winners |\n|---|---|")
        out += [f"| {k} | {_fmt(v)} |" for k, v in winner_figures().items()]
        out.append("")
        return
    out.append(f"Suite `{summary.get('suite')}` against {summary.get('url')}, max eval instances "
               f"{summary.get('max_eval_instances') or 'as the run specs say'}; requests sent through "
               f"{summary.get('client')}.\n")
    out.append("| Figure | This run | Winners (published) | Metric | Note |\n|---|---|---|---|---|")
    for row in summary.get("rows", []):
        winners = _fmt(row.get("winners")) if row.get("winners_label") else "—"
        if row.get("winners_label") and row.get("winners_label") != row["label"]:
            winners += f" ({row['winners_label']})"
        out.append(f"| {row['label']} | {_fmt(row.get('value'))} | {winners} | {row.get('metric') or ''} | "
                   f"{row.get('note') or ''} |")
    out.append("")
    score = summary.get("score")
    if score:
        ours = score["ours"]
        out.append(f"Mean-win-rate score (open scenarios, the challenge's arithmetic) in a pool of this run and the "
                   f"{score['pool_size'] - 1} published 4090 submissions: **{_fmt(ours['score'])}**, rank "
                   f"{score['rank']} of {score['pool_size']}; the winners in the same pool: "
                   f"{_fmt(score['winner_in_pool']['score'])}. Per scenario: "
                   + ", ".join(f"{k} {_fmt(v)}" for k, v in ours["scenarios"].items())
                   + f". Published Score_open of the winners (pool of the whole track): "
                   f"{_fmt(winner_figures()['Score_open'])}; Score_full {_fmt(winner_figures()['Score_full'])}.\n")
    elif summary.get("suite") == "quick":
        out.append("The quick suite is a local check of the server and model, not a challenge figure: no "
                   "win-rate score is computed for it.\n")
    if _plot_scores(summary.get("rows", []), images / "scores.png"):
        out.append(f"![scores]({images.name}/scores.png)\n")


def _training_section(run_dir: Path, images: Path, out: list[str]) -> None:
    out.append("## Training\n")
    record = _json(run_dir / "train" / "stage.json")
    metrics = _jsonl(run_dir / "train" / "metrics.jsonl")
    if not record and not metrics:
        out.append(f"Training: {NOT_RUN}.\n")
        return
    details = (record or {}).get("details", {})
    budget_h = details.get("budget_hours")
    used_s = details.get("budget_used_s")
    peak = details.get("peak_gpu_memory_gib")
    cap = details.get("max_gpu_memory_gib")
    speeds = [m["tokens_per_s"] for m in metrics if m.get("event") == "train" and m.get("tokens_per_s")]
    out.append("| | Value | Limit |\n|---|---|---|")
    out.append(f"| status / outcome | {(record or {}).get('status', NOT_RUN)} / "
               f"{(record or {}).get('outcome') or details.get('outcome') or '—'} | |")
    out.append(f"| wall-clock used | {_fmt(used_s / 3600 if used_s is not None else None, 2)} h | "
               f"{_fmt(budget_h, 2) if budget_h is not None else '—'} h budget (challenge: {BUDGET_HOURS:g} h) |")
    out.append(f"| peak GPU memory | {_fmt(peak, 2)} GiB | {_fmt(cap, 1) if cap else '—'} GiB cap "
               f"(RTX 4090: {MEMORY_GIB:g} GiB) |")
    out.append(f"| optimiser steps | {_fmt(details.get('global_step'))} | |")
    out.append(f"| tokens seen | {_fmt(details.get('tokens_seen'))} | |")
    if speeds:
        out.append(f"| tokens/s (mean of logged steps) | {sum(speeds) / len(speeds):,.0f} | last: "
                   f"{speeds[-1]:,.0f} |")
    else:
        out.append(f"| tokens/s | {NOT_RUN} | |")
    out.append("")
    if used_s is not None:
        share = used_s / (BUDGET_HOURS * 3600)
        out.append(f"Budget used: {share:.1%} of the challenge's {BUDGET_HOURS:g} h.")
    if peak is not None:
        out.append(f"Peak memory: {peak / MEMORY_GIB:.1%} of {MEMORY_GIB:g} GiB"
                   f"{' — OVER the 4090 limit' if peak > MEMORY_GIB else ''}.")
    out.append("")
    if _plot_loss(metrics, images / "loss.png"):
        out.append(f"![training loss]({images.name}/loss.png)\n")
    elif (run_dir / "train" / "loss.png").is_file():
        out.append("![training loss](train/loss.png)\n")


def _data_section(run_dir: Path, out: list[str]) -> None:
    out.append("## Data\n")
    manifest = _json(run_dir / "data" / "manifest.json")
    if not manifest:
        out.append(f"Data preparation: {NOT_RUN}.\n")
    else:
        rows = manifest.get("rows", {})
        tokens = manifest.get("tokens", {})
        out.append(f"Mode `{manifest.get('mode')}`, seed {manifest.get('seed')}.\n")
        out.append("| Split | Rows | Tokens | Mean tokens/row | Rows over window |\n|---|---|---|---|---|")
        for split in ("train", "eval"):
            stats = tokens.get(split, {})
            out.append(f"| {split} | {_fmt(rows.get(split))} | {_fmt(stats.get('total_tokens'))} | "
                       f"{_fmt(stats.get('mean_tokens'))} | {_fmt(stats.get('rows_over_window'))} |")
        out.append("")
    contamination = _json(run_dir / "data" / "contamination.json")
    if contamination is None:
        out.append(f"Contamination check: {NOT_RUN}.\n")
    else:
        out.append("Contamination check:\n\n```json\n" + json.dumps(contamination, indent=2, sort_keys=True)[:3000]
                   + "\n```\n")


def _provenance_section(run_dir: Path, out: list[str]) -> None:
    out.append("## Images and versions\n")
    build = next((_json(run_dir / name) for name in BUILD_MANIFESTS if (run_dir / name).is_file()), None)
    if build is None:
        out.append(f"Image build: {NOT_RUN} (no build manifest in the run directory).\n")
    else:
        images = build.get("images", build)
        out.append("| Image | Digest |\n|---|---|")
        for name, value in images.items():
            digest = value.get("digest") if isinstance(value, dict) else value
            out.append(f"| {name} | `{digest}` |")
        out.append("")
    manifest = _json(run_dir / "manifest.json") or {}
    versions = manifest.get("versions")
    if not versions:
        out.append(f"Versions: {NOT_RUN}.\n")
    else:
        out.append("| Package | Version |\n|---|---|")
        out += [f"| {k} | {v if v is not None else '—'} |" for k, v in sorted(versions.items())]
        out.append("")
    stages = manifest.get("stages", {})
    if stages:
        out.append("| Stage | Status | Outcome | Duration (s) | Outputs digest |\n|---|---|---|---|---|")
        for name, info in stages.items():
            out.append(f"| {name} | {info.get('status')} | {info.get('outcome') or '—'} | "
                       f"{_fmt(info.get('duration_s'), 1)} | `{(info.get('outputs_digest') or '—')[:16]}` |")
        out.append("")


def build_report(run_dir: RunDir | str | Path) -> Path:
    """Write run_dir/report.md and run_dir/report/*.png from the run directory's files; return report.md."""
    root = run_dir.path if isinstance(run_dir, RunDir) else Path(run_dir).expanduser().resolve()
    images = root / "report"
    out = [f"# Reproduction report: {root.name}\n",
           "Team Upaya's Birbal (NeurIPS 2023 LLM Efficiency Challenge, RTX 4090 track) rebuilt with birbal-repro. "
           "Every figure below is read from this run directory; parts not run say so.\n"]
    summary = _json(root / "evaluate" / "summary.json")
    record = _json(root / "evaluate" / "stage.json")
    _scores_section(summary if record is None or record.get("status") == "complete" else None, record, images, out)
    out += report_section(root)  # compare/compare.json, when `birbal compare` has been run on this run dir
    _training_section(root, images, out)
    _data_section(root, out)
    _provenance_section(root, out)
    path = root / "report.md"
    atomic_write_text(path, "\n".join(out) + "\n")
    return path
