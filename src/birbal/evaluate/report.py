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
from birbal.train.budget import describe_plan

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
    """A value as a reader wants it: floats rounded, dicts as `key: value` pairs, lists joined, never a repr."""
    if value is None:
        return NOT_RUN
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v, digits)}" for k, v in value.items()) or "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, digits) for v in value) or "—"
    return str(value)


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return NOT_RUN
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


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
        ax.annotate(f"{train[-1][1]:.3f}", train[-1], textcoords="offset points", xytext=(4, 6), fontsize=8)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
        for step, value in evals:  # each eval's value, readable without the axis
            ax.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(0, 7), fontsize=7,
                        ha="center")
    ax.set_title("training and eval loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_scores(rows: list[dict[str, Any]], path: Path, comparable: bool = True) -> bool:
    pairs = [(r["label"], r["value"], r.get("winners") if r.get("winners_label") else None) for r in rows
             if r.get("value") is not None]
    if not pairs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(pairs) + 1.8))
    ys = list(range(len(pairs)))
    with_winners = comparable and any(p[2] is not None for p in pairs)
    ours = ax.barh([y + (0.2 if with_winners else 0) for y in ys], [p[1] for p in pairs],
                   height=0.4 if with_winners else 0.6, label="this run")
    ax.bar_label(ours, fmt="%.3f", padding=3, fontsize=8)
    if with_winners:
        theirs = ax.barh([y - 0.2 for y in ys], [p[2] or 0.0 for p in pairs], height=0.4, label="winners (published)")
        ax.bar_label(theirs, labels=[f"{p[2]:.3f}" if p[2] is not None else "—" for p in pairs], padding=3,
                     fontsize=8)
    ax.set_yticks(ys, [p[0] for p in pairs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("score (higher is better)")
    ax.set_title("this run beside the winners' published figures" if with_winners else
                 "quick suite: a local check, not comparable to the winners' figures", fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _winners_table(summary: dict[str, Any] | None, out: list[str]) -> None:
    """The winners' published figures, always, with this run's beside them where it has the same figure."""
    ours = {}
    comparable = bool(summary) and summary.get("suite") == "open"
    if comparable:
        ours = {row.get("winners_label") or row["label"]: row.get("value") for row in summary.get("rows", [])}
    out.append(f"The winners' published figures ({WINNER_ID}):\n")
    if summary and not comparable:
        out.append(f"(This run's `{summary.get('suite')}` suite is a local check on other questions: **not "
                   "comparable** to these; `--suite open` runs the challenge's scenarios.)\n")
    out.append("| Figure | Winners | This run |\n|---|---|---|")
    for label, value in winner_figures().items():
        mine = _fmt(ours.get(label)) if comparable and ours.get(label) is not None else (
            "not comparable" if summary and not comparable else NOT_RUN)
        out.append(f"| {label} | {_fmt(value)} | {mine} |")
    out.append("")


def _scores_section(summary: dict[str, Any] | None, record: dict[str, Any] | None, attempt: dict[str, Any] | None,
                    images: Path, out: list[str]) -> None:
    out.append("## Scores next to the winners'\n")
    if attempt and attempt.get("status") == "failed":
        if summary:
            out.append(f"The last evaluate attempt failed ({attempt.get('finished_at')}): {attempt.get('error')}. "
                       f"The figures below are from the last complete evaluation ({(record or {}).get('finished_at')}).\n")
        else:
            out.append(f"The evaluate stage failed: {attempt.get('error')}\n")
    elif record and record.get("status") == "failed":  # a record from an older birbal-repro
        out.append(f"The evaluate stage failed: {record.get('error')}\n")
    if not summary:
        out.append(f"Evaluation: {NOT_RUN}.\n")
        _winners_table(None, out)
        return
    details = (record or {}).get("details") or {}
    url = details.get("url") or summary.get("url") or "an unrecorded address"
    out.append(f"Suite `{summary.get('suite')}` against {url} (server of run `{details.get('server_run_id') or '—'}`"
               f"), max eval instances {summary.get('max_eval_instances') or 'as the run specs say'}; requests sent "
               f"through {summary.get('client')}.\n")
    if summary.get("failed_runs"):
        out.append(f"**{len(summary['failed_runs'])} run specs failed** and are missing from the figures: "
                   + ", ".join(f"`{name}`" for name in summary["failed_runs"]) + ".\n")
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
    if _plot_scores(summary.get("rows", []), images / "scores.png", comparable=summary.get("suite") == "open"):
        out.append(f"![scores]({images.name}/scores.png)\n")
    _winners_table(summary, out)


def _training_section(run_dir: Path, images: Path, out: list[str]) -> None:
    out.append("## Training\n")
    record = _json(run_dir / "train" / "stage.json")
    attempt = _json(run_dir / "train" / "stage.attempt.json")
    metrics = _jsonl(run_dir / "train" / "metrics.jsonl")
    if not record and not metrics and not attempt:
        out.append(f"Training: {NOT_RUN}.\n")
        return
    if attempt and attempt.get("status") == "failed":
        out.append(f"The last train attempt failed ({attempt.get('finished_at')}): {attempt.get('error')}"
                   + (" The figures below are from the last complete training.\n" if record else "\n"))
    details = (record or {}).get("details", {})
    budget_h = details.get("budget_hours")
    used_s = details.get("budget_used_s")
    peak = details.get("peak_gpu_memory_gib")
    cap = details.get("max_gpu_memory_gib")
    device = details.get("device")
    speeds = [m["tokens_per_s"] for m in metrics if m.get("event") == "train" and m.get("tokens_per_s")]
    lost = details.get("time_lost_to_crashes_s")
    out.append("| | Value | Limit |\n|---|---|---|")
    out.append(f"| status / outcome | {(record or {}).get('status', NOT_RUN)} / "
               f"{(record or {}).get('outcome') or details.get('outcome') or '—'} | |")
    own = f" ({used_s / (budget_h * 3600):.1%} of it)" if used_s is not None and budget_h else ""
    out.append(f"| wall-clock used | {_fmt(used_s / 3600 if used_s is not None else None, 2)} h | "
               f"{_fmt(budget_h, 2) if budget_h is not None else '—'} h budget{own} (challenge: {BUDGET_HOURS:g} h) |")
    plan, over = details.get("last_step_plan"), details.get("budget_overrun_s") or 0
    if over > 0:
        cause = f": {describe_plan(plan)}" if plan else ""
        out.append(f"| **over the budget** | {over} s | a stall outran the plan's margin{cause} |")
    out.append(f"| sessions / time lost to crashes | {_fmt(details.get('sessions'))} / "
               f"{_hours(lost) if lost is not None else NOT_RUN} | |")
    shown_peak = f"{_fmt(peak, 2)} GiB" if peak is not None else (
        f"not measured (trained on {device})" if device and not str(device).startswith("cuda") else NOT_RUN)
    out.append(f"| peak GPU memory | {shown_peak} | {f'{_fmt(cap, 1)} GiB cap' if cap else 'no cap'} "
               f"(RTX 4090: {MEMORY_GIB:g} GiB) |")
    out.append(f"| optimiser steps | {_fmt(details.get('global_step'))} | "
               f"{_fmt(details.get('total_steps')) if details.get('total_steps') else ''} |")
    out.append(f"| tokens seen | {_fmt(details.get('tokens_seen'))} | |")
    if details.get("best_eval_loss") is not None:
        out.append(f"| best eval loss (step) | {_fmt(details['best_eval_loss'], 4)} ({details.get('best_step')}) | |")
    if speeds:
        out.append(f"| tokens/s (mean of logged steps) | {sum(speeds) / len(speeds):,.0f} | last: "
                   f"{speeds[-1]:,.0f} |")
    else:
        out.append(f"| tokens/s | {NOT_RUN} | |")
    out.append("")
    if used_s is not None:
        share = used_s / (BUDGET_HOURS * 3600)
        if budget_h:
            out.append(f"Budget used: {used_s / (budget_h * 3600):.1%} of this run's {budget_h:g} h; "
                       f"{share:.1%} of the challenge's {BUDGET_HOURS:g} h.")
        else:
            out.append(f"Budget used: {share:.1%} of the challenge's {BUDGET_HOURS:g} h.")
    if lost:
        out.append(f"Time lost to crashes: {_hours(lost)} (work after the last checkpoint of each crashed session, "
                   "redone on resume, counted in the budget).")
    if peak is not None:
        out.append(f"Peak memory: {peak / MEMORY_GIB:.1%} of {MEMORY_GIB:g} GiB"
                   f"{' — OVER the 4090 limit' if peak > MEMORY_GIB else ''}.")
    out.append("")
    if _plot_loss(metrics, images / "loss.png"):
        out.append(f"![training loss]({images.name}/loss.png)\n")
    elif (run_dir / "train" / "loss.png").is_file():
        out.append("![training loss](train/loss.png)\n")


def _over_window(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{v} over {k}" for k, v in value.items()) or "—"
    return _fmt(value)


def _data_section(run_dir: Path, out: list[str]) -> None:
    out.append("## Data\n")
    manifest = _json(run_dir / "data" / "manifest.json")
    if not manifest:
        out.append(f"Data preparation: {NOT_RUN}.\n")
    else:
        rows = manifest.get("rows", {})
        tokens = manifest.get("tokens", {})
        out.append(f"Mode `{manifest.get('mode')}`, seed {manifest.get('seed')}.\n")
        out.append("| Split | Rows | Tokens | Mean tokens/row | Rows over window (tokens) |\n|---|---|---|---|---|")
        for split in ("train", "eval"):
            stats = tokens.get(split, {})
            total = stats.get("total_tokens")
            out.append(f"| {split} | {_fmt(rows.get(split))} | {total if total is not None else NOT_RUN} | "
                       f"{_fmt(stats.get('mean_tokens'), 1)} | {_over_window(stats.get('rows_over_window'))} |")
        out.append("")
    contamination = _json(run_dir / "data" / "contamination.json")
    if contamination is None:
        out.append(f"Contamination check: {NOT_RUN}.\n")
        return
    out.append(f"Contamination check ({contamination.get('ngram')}-gram overlap, mode `{contamination.get('mode')}`): "
               f"{_fmt(sum((contamination.get('rows_flagged') or {}).values()))} rows flagged, "
               f"{_fmt(contamination.get('rows_dropped'))} dropped.\n")
    benchmarks = contamination.get("benchmarks") or {}
    overlaps = contamination.get("overlaps") or {}
    checked = contamination.get("rows_checked") or {}
    if benchmarks:
        names = list(benchmarks)
        out.append("| Source | Rows checked | Rows flagged | " + " | ".join(f"overlaps {n}" for n in names) + " |")
        out.append("|---|---|---|" + "---|" * len(names))
        for source in sorted(set(checked) | set(overlaps)):
            out.append(f"| {source} | {_fmt(checked.get(source))} | "
                       f"{_fmt((contamination.get('rows_flagged') or {}).get(source, 0))} | "
                       + " | ".join(_fmt((overlaps.get(source) or {}).get(n, 0)) for n in names) + " |")
        out.append("")
        out.append("Benchmarks indexed: " + "; ".join(
            f"{name} ({_fmt(info.get('items'))} items, {_fmt(info.get('ngrams'))} n-grams, from "
            f"{info.get('origin')})" for name, info in benchmarks.items()) + ".\n")


def _stages_section(run_dir: Path, out: list[str]) -> None:
    """Every stage, run or not, with its last failed attempt when one came after (or instead of) a complete one."""
    from birbal.rundir import STAGE_FOLDERS, STAGES

    out.append("## Stages\n")
    out.append("| Stage | Status | Outcome | Duration | Finished | Last failed attempt |\n|---|---|---|---|---|---|")
    for stage in STAGES:
        folder = run_dir / STAGE_FOLDERS[stage]
        record, attempt = _json(folder / "stage.json"), _json(folder / "stage.attempt.json")
        failed = f"{attempt.get('finished_at')}: {attempt.get('error')}" if attempt and attempt.get(
            "status") == "failed" else "—"
        if attempt and attempt.get("status") == "running":
            failed = f"running since {attempt.get('started_at')} (or killed)"
        if record is None:
            out.append(f"| {stage} | {NOT_RUN if attempt is None else 'never completed'} | — | — | — | {failed} |")
            continue
        duration = record.get("duration_s")
        out.append(f"| {stage} | {record.get('status')} | {record.get('outcome') or '—'} | "
                   f"{_hours(duration) if duration is not None else '—'} | {record.get('finished_at') or '—'} | "
                   f"{failed} |")
    out.append("")


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
        out.append("| Stage | Outputs digest |\n|---|---|")
        for name, info in stages.items():
            out.append(f"| {name} | `{(info.get('outputs_digest') or '—')[:16]}` |")
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
    attempt = _json(root / "evaluate" / "stage.attempt.json")
    complete = record is not None and record.get("status") == "complete"
    _scores_section(summary if complete else None, record, attempt, images, out)
    out += report_section(root)  # compare/compare.json, when `birbal compare` has been run on this run dir
    _stages_section(root, out)
    _training_section(root, images, out)
    _data_section(root, out)
    _provenance_section(root, out)
    path = root / "report.md"
    atomic_write_text(path, "\n".join(out) + "\n")
    return path
