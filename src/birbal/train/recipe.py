"""The QLoRA training recipe: one readable loop, torchtune-style (setup, train, save_checkpoint, cleanup).

Why not HF Trainer: it writes checkpoints in place (a kill mid-save leaves a checkpoint that looks whole), it
cannot stop *before* a step that would overrun a wall-clock budget, its NEFTune scales noise by packed-row length,
and its paged-optimizer resume is fragile. transformers (model, scheduler), peft (LoRA) and bitsandbytes (NF4,
paged AdamW) still do all the numerical work.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from birbal.config import Recipe
from birbal.data.prepare import EVAL_FILE, TRAIN_FILE
from birbal.data.sources import read_rows
from birbal.errors import TrainError
from birbal.fsutil import atomic_directory, atomic_write_json, digest_of, hash_tree
from birbal.models import load_tokenizer, resolve_device
from birbal.train import checkpoint as ckpt
from birbal.train.budget import BudgetLedger, predicted_next_s, spike_held
from birbal.train.metrics import (
    H200_BF16_TFLOPS_MEASURED,
    MetricsLog,
    flops_per_token,
    mean_attention_context,
    peak_gpu_memory_gib,
    plot_loss,
)
from birbal.train.model import build_qlora_model, response_loss_sum
from birbal.train.multipack import estimated_len, next_fit_bins, plan_steps
from birbal.train.neftune import NEFTune
from birbal.train.packing import (
    Example,
    PackedRow,
    UpstreamEncoder,
    collate,
    make_row,
    padded_width,
    tokenize_example,
)

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
METRICS = "metrics.jsonl"
LEDGER = "ledger.jsonl"
LOSS_PLOT = "loss.png"
# Fields that may differ between a checkpoint and the recipe resuming it: they change no numbers.
RESUMABLE_DIFFERENCES = ("budget_hours", "max_gpu_memory_gib", "device", "logging_steps")


@dataclass
class TrainResult:
    outcome: str  # finished | stopped_by_budget
    outputs: dict[str, str]
    details: dict


def cap_gpu_memory(device: torch.device, gib: float) -> float:
    """Cap this process's share of the GPU (PyTorch's caching allocator) at `gib`; returns the fraction set."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def numeric_recipe_digest(recipe: Recipe) -> str:
    """What a checkpoint must match to be resumed: everything that changes the numbers."""
    train = recipe.train.model_dump(mode="json", exclude=set(RESUMABLE_DIFFERENCES))
    return digest_of({"model": recipe.model.model_dump(mode="json"),
                      "quantization": recipe.quantization.model_dump(mode="json"),
                      "lora": recipe.lora.model_dump(mode="json"), "train": train})


class QLoRARecipe:
    def __init__(self, recipe: Recipe, data_dir: Path, out_dir: Path, cache_dir: Path,
                 inputs: dict | None = None):
        """`inputs` (the data's outputs digest and the flattened recipe, from the train stage) is saved in every
        checkpoint, so a resume can tell a checkpoint trained on other data (`checkpoint.resume_problem`)."""
        self.inputs = inputs
        self.cfg = recipe
        self.train_cfg = recipe.train
        self.data_dir = data_dir
        self.out_dir = out_dir
        self.cache_dir = cache_dir
        for name in (TRAIN_FILE, EVAL_FILE):
            if not (data_dir / name).is_file():
                raise TrainError(f"{data_dir / name} is missing: run the prepare-data stage first")
        self.device = resolve_device(self.train_cfg.device)
        self.checkpoint_dir = out_dir / CHECKPOINTS
        self.metrics = MetricsLog(out_dir / METRICS)
        self.dropped_too_long: dict[str, int] = {}
        self.session_tokens_per_s = 0.0
        self.ledger = BudgetLedger.open(out_dir / LEDGER, self.train_cfg.budget_hours)

    # ---- setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.train_cfg
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizer(self.cfg.model.tokenizer, self.cache_dir)
        self.upstream_encoder = UpstreamEncoder(self.tokenizer) if cfg.tokenization == "upstream" else None
        self.train_examples = self._examples(TRAIN_FILE, None)
        if not self.train_examples:
            raise TrainError("no training rows fit the sequence length")
        lengths = np.asarray([len(ex) for ex in self.train_examples], dtype=np.int64)
        self.plan = plan_steps(lengths, seed=cfg.seed, sequence_len=cfg.sequence_len,
                               micro_batch_size=cfg.micro_batch_size, accumulation=cfg.gradient_accumulation_steps,
                               num_epochs=cfg.num_epochs, epoch_length=cfg.epoch_length, max_steps=cfg.max_steps,
                               packing=cfg.sample_packing)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.total_steps = self.plan.total_steps
        self.eval_rows = self._eval_rows()
        self.model = build_qlora_model(self.cfg, self.cache_dir, self.device)
        self.neftune = (NEFTune(self.model.get_input_embeddings(), cfg.neftune_noise_alpha, cfg.neftune_scale)
                        if cfg.neftune_noise_alpha else None)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer()
        if self.device.type == "cuda" and cfg.max_gpu_memory_gib is not None:
            # bitsandbytes' paged optimizer state lives in CUDA managed memory, which PyTorch's cap does not see:
            # take its size (8 bytes per trainable parameter for 32-bit AdamW, 2 for 8-bit) off the cap, so the
            # whole process stays within max_gpu_memory_gib.
            per_param = {"paged_adamw_32bit": 8, "paged_adamw_8bit": 2}.get(cfg.optimizer, 0)
            paged_gib = per_param * sum(p.numel() for p in self.trainable) / 2**30
            cap_gpu_memory(self.device, cfg.max_gpu_memory_gib - paged_gib)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=self.total_steps)
        self.state = {"global_step": 0, "tokens_seen": 0, "eval_history": [], "best_step": None,
                      "best_eval_loss": None, "step_time_s": None, "eval_time_s": None, "save_time_s": None,
                      "recipe_digest": numeric_recipe_digest(self.cfg), "inputs": self.inputs}
        self._resume_if_possible()

    def _examples(self, name: str, limit: int | None) -> list[Example]:
        """Tokenised rows in file order; those longer than sequence_len, or empty, dropped (axolotl's
        `drop_long_seq`, utils/trainer.py:103-104, on train and eval alike)."""
        cfg = self.train_cfg
        examples, dropped = [], 0
        for i, row in enumerate(read_rows(self.data_dir / name, name)):
            if limit is not None and i >= limit:
                break
            ex = tokenize_example(self.tokenizer, row["question"], row["answer"], cfg.train_on_inputs,
                                  mode=cfg.tokenization, upstream=self.upstream_encoder, max_length=cfg.sequence_len)
            if 0 < len(ex) <= cfg.sequence_len:
                examples.append(ex)
            else:
                dropped += 1
        self.dropped_too_long[name] = dropped
        return examples

    def _width(self, real: int) -> int:
        cfg = self.train_cfg
        return padded_width(real, 64 * math.ceil(cfg.sequence_len / 64) if cfg.pad_to_sequence_len else 64)

    def _row(self, examples: list[Example]) -> PackedRow:
        return make_row(examples, self.tokenizer.eos_token_id, self._width(sum(len(ex) for ex in examples)))

    def _micro_batch(self, indices, examples: list[Example]) -> list[PackedRow]:
        """One micro-batch: with packing, ONE row of the bin's examples (axolotl's multipack puts one bin of
        micro_batch_size x sequence_len tokens in a micro-batch); without, one row per example, as wide as the
        longest."""
        chosen = [examples[i] for i in indices]
        if self.train_cfg.sample_packing:
            return [self._row(chosen)]
        width = self._width(max(len(ex) for ex in chosen))
        return [make_row([ex], self.tokenizer.eos_token_id, width) for ex in chosen]

    def _eval_rows(self) -> list[list[PackedRow]]:
        """The first eval_max_rows eval rows (`ds["test"].select(range(instances_for_test_metric))`, their
        utils/data.py:282), next-fit in file order (SequentialSampler) into the same bins as training; the eval
        loader stops after its own length estimate, as the training one does."""
        cfg = self.train_cfg
        examples = self._examples(EVAL_FILE, cfg.eval_max_rows)
        if not examples:
            raise TrainError("no eval rows fit the sequence length")
        order = np.arange(len(examples))
        if cfg.sample_packing:
            lengths = np.asarray([len(ex) for ex in examples], dtype=np.int64)
            bins = next_fit_bins(lengths, order, cfg.sequence_len * cfg.micro_batch_size)
            if cfg.epoch_length == "estimate":
                bins = bins[:estimated_len(int(lengths.sum()), self.plan.efficiency, cfg.sequence_len,
                                           cfg.micro_batch_size)]
        else:
            bins = [order[i:i + cfg.micro_batch_size] for i in range(0, len(order), cfg.micro_batch_size)]
        return [self._micro_batch(b, examples) for b in bins]

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.train_cfg
        kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                      weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adamw_torch":
            return torch.optim.AdamW(self.trainable, **kwargs)
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW32bit if cfg.optimizer == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
        return cls(self.trainable, **kwargs)

    def _resume_if_possible(self) -> None:
        """Resume from the newest checkpoint that reads whole; a corrupt one (a truncated or missing file) is set
        aside as `step-N.corrupt` with a one-line warning, and the one before it is tried."""
        checkpoints = ckpt.list_checkpoints(self.checkpoint_dir)
        loaded = None
        for step, folder in reversed(checkpoints):
            try:
                loaded = step, folder, ckpt.read_checkpoint(folder, str(self.device))
                break
            except ckpt.CorruptCheckpoint as err:
                aside = ckpt.set_aside(folder)
                tqdm.write(file=sys.stderr, s=f"warning: {err}; moved to {aside.name}, trying the checkpoint before it")
        if loaded is None:
            self.metrics.truncate_after(0)
            return
        step, folder, (saved, adapter, optimizer, scheduler, rng) = loaded
        if saved.get("recipe_digest") != self.state["recipe_digest"]:
            raise TrainError(
                f"checkpoint {folder} was made by a different recipe (model, LoRA or optimisation values differ; "
                f"only {', '.join(RESUMABLE_DIFFERENCES)} may change on resume): use a new --run-dir")
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, adapter)
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(scheduler)
        ckpt.restore_rng_state(rng)
        inputs = self.state.get("inputs")
        self.state.update(saved)
        if inputs is not None:
            self.state["inputs"] = inputs  # the checkpoints saved from here on record this run's inputs
        self.metrics.truncate_after(step)
        tqdm.write(file=sys.stderr, s=f"resuming from {folder.name}: step {step}/{self.total_steps}, "
                   f"budget used {self.ledger.used_s() / 3600:.3f} h of {self.train_cfg.budget_hours} h")

    # ---- training ------------------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[list[PackedRow] | None]:
        """The micro-batches of optimiser step `step` (None: upstream's no-op batch); the plan is a pure function
        of (seed, data), so resume needs no cursor."""
        return [None if b is None else self._micro_batch(b, self.train_examples) for b in self.plan.steps[step]]

    def _autocast(self):
        if self.device.type == "cuda" and self.train_cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def _to_device(self, rows: list[PackedRow]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in collate(rows).items()}

    def train_step(self, step: int) -> dict:
        """One optimiser step. loss_averaging=micro_batch_mean: each micro-batch's mean loss / accumulation steps is
        backpropagated (HF Trainer 4.35: `accelerator.backward` divides by gradient_accumulation_steps, the
        model's loss being a mean over the micro-batch's labelled tokens), so the step's loss is the mean of the
        micro-batches' means; a micro-batch with no labelled token (upstream: NaN) adds nothing. token_mean:
        the step's token sum over its labelled tokens."""
        cfg = self.train_cfg
        self.model.train()
        micro_rows = [rows for rows in self._micro_batches(step) if rows is not None]
        micro = [self._to_device(rows) for rows in micro_rows]
        labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total_loss = 0.0
        for batch in micro:
            if self.neftune:
                self.neftune.example_length = batch["example_length"]
            with self._autocast():
                loss_sum, n = response_loss_sum(self.model, batch)
            if cfg.loss_averaging == "micro_batch_mean":
                loss = loss_sum / max(n, 1) / cfg.gradient_accumulation_steps
            else:
                loss = loss_sum / max(labelled, 1)
            loss.backward()
            total_loss += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        rows = [r for mb in micro_rows for r in mb]
        return {"loss": total_loss, "grad_norm": float(grad_norm),
                "tokens": sum(r.real_tokens for r in rows), "labelled_tokens": labelled,
                "lr": self.scheduler.get_last_lr()[0],
                "mean_context": mean_attention_context([n for r in rows for n in r.example_lengths],
                                                       getattr(self.model.get_base_model().config, "sliding_window", None))}

    @torch.no_grad()
    def evaluate(self) -> float:
        """eval_loss_averaging=bin_mean: the mean over eval micro-batches of each one's mean loss (HF's
        evaluation_loop repeats a batch's loss batch-size times, one packed row here, and takes the mean);
        token_mean: the eval tokens' mean."""
        self.model.eval()
        total, count, means = 0.0, 0, []
        for rows in self.eval_rows:
            batch = self._to_device(rows)
            with self._autocast():
                loss_sum, n = response_loss_sum(self.model, batch)
            total += float(loss_sum)
            count += n
            if n:
                means.extend([float(loss_sum) / n] * len(rows))
        if self.train_cfg.eval_loss_averaging == "bin_mean":
            return sum(means) / max(len(means), 1)
        return total / max(count, 1)

    def save_checkpoint(self) -> None:
        t0 = time.time()
        step = self.state["global_step"]
        # As HF Trainer does, the best model is chosen among saved checkpoints only (by the eval at their step).
        evaluated = [e["eval_loss"] for e in self.state["eval_history"] if e["step"] == step]
        if evaluated and (self.state["best_eval_loss"] is None or evaluated[-1] < self.state["best_eval_loss"]):
            self.state["best_eval_loss"], self.state["best_step"] = evaluated[-1], step
        ckpt.save_checkpoint(self.checkpoint_dir, step, self.model, self.optimizer, self.scheduler, self.state,
                             base_model=self.cfg.model.name_or_path)
        self.ledger.checkpoint(step)
        protect = {step} | ({self.state["best_step"]} if self.state["best_step"] is not None else set())
        ckpt.prune_checkpoints(self.checkpoint_dir, self.train_cfg.save_total_limit, protect)
        self.state["save_time_s"] = spike_held(self.state["save_time_s"], time.time() - t0)

    def _eval_and_record(self) -> None:
        t0 = time.time()
        eval_loss = self.evaluate()
        eval_s = time.time() - t0
        self.state["eval_time_s"] = spike_held(self.state["eval_time_s"], eval_s)  # what the budget plans with
        step = self.state["global_step"]
        self.state["eval_history"].append({"step": step, "eval_loss": eval_loss})
        self.metrics.write(event="eval", step=step, eval_loss=eval_loss, eval_time_s=round(eval_s, 3))  # as measured
        tqdm.write(file=sys.stderr, s=f"step {step}: eval_loss {eval_loss:.4f}")

    def _predicted_s(self, next_step: int) -> float:
        """Time the next step needs, its eval if one is due, and what ending after it costs (`predicted_next_s`)."""
        step_s = self.state["step_time_s"] or 0.0
        return predicted_next_s(next_step, step_s=step_s, eval_s=self.state["eval_time_s"] or step_s,
                                save_s=self.state["save_time_s"] or (60.0 if self.device.type == "cuda" else 5.0),
                                eval_steps=self.train_cfg.eval_steps, eval_at_end=self.train_cfg.eval_at_end,
                                budget_s=self.ledger.budget_s)

    def _print_projection(self, step: int, tokens_per_s: float) -> None:
        """Planned tokens (this data's packed rows x epochs) against the measured rate and the budget left."""
        per_epoch = sum(len(ex) for ex in self.train_examples)
        planned = per_epoch * min(self.train_cfg.num_epochs, self.total_steps / self.steps_per_epoch)
        hours = planned / max(tokens_per_s, 1e-9) / 3600
        left_h = self.ledger.left_s() / 3600
        verdict = "fits" if hours <= left_h + self.ledger.used_s() / 3600 else \
            f"does not fit: the budget stops it near epoch {tokens_per_s * self.ledger.budget_s / per_epoch:.2f}"
        tqdm.write(file=sys.stderr, s=f"projection at step {step}: {per_epoch:,} tokens per epoch at "
                   f"{tokens_per_s:,.0f} tokens/s -> {hours:.2f} h for the planned {planned:,.0f} tokens; "
                   f"budget {self.train_cfg.budget_hours} h ({verdict})")

    def train(self) -> str:
        cfg = self.train_cfg
        self.ledger.start_session(self.state["global_step"])
        session_start_step = self.state["global_step"]
        session_t0 = time.time()
        session_tokens = 0
        outcome = "finished"
        plan = None  # what the last started step was planned to cost, against what was left (the ledger keeps it)
        model_config = self.model.get_base_model().config
        bar = tqdm(file=sys.stderr, total=self.total_steps, initial=self.state["global_step"], desc="train", unit="step",
                   dynamic_ncols=True)
        try:
            while self.state["global_step"] < self.total_steps:
                next_step = self.state["global_step"] + 1
                planned_s, now = self._predicted_s(next_step), time.time()
                left_s = self.ledger.left_s(now)
                if planned_s > left_s:
                    outcome = "stopped_by_budget"
                    tqdm.write(file=sys.stderr, s=f"budget: {left_s / 60:.1f} min left, not enough for step {next_step} "
                               f"and the last checkpoint ({planned_s:.1f} s planned): stopping")
                    break
                plan = {"step": next_step, "planned_s": planned_s, "left_s": left_s, "at": now}
                t0 = time.time()
                stats = self.train_step(self.state["global_step"])
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                step_s = time.time() - t0
                self.state["step_time_s"] = spike_held(self.state["step_time_s"], step_s)
                self.state["global_step"] = next_step
                self.state["tokens_seen"] += stats["tokens"]
                session_tokens += stats["tokens"]
                tokens_per_s = stats["tokens"] / step_s
                mfu = tokens_per_s * flops_per_token(model_config, stats["mean_context"]) / (H200_BF16_TFLOPS_MEASURED * 1e12)
                self.metrics.write(event="train", step=next_step, loss=stats["loss"], lr=stats["lr"],
                                   grad_norm=stats["grad_norm"], tokens=stats["tokens"], step_s=round(step_s, 4),
                                   tokens_per_s=round(tokens_per_s, 1), mfu_vs_h200=round(mfu, 4),
                                   peak_gpu_memory_gib=peak_gpu_memory_gib())
                self.ledger.heartbeat(next_step, step_s=round(step_s, 4))
                if next_step - session_start_step == 3 or next_step % cfg.eval_steps == 0:
                    self._print_projection(next_step, tokens_per_s)
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                budget_left=f"{self.ledger.left_s() / 3600:.2f}h")
                if next_step % cfg.eval_steps == 0:
                    self._eval_and_record()
                if next_step % cfg.save_steps == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        step = self.state["global_step"]
        # HF Trainer 4.35 evaluates only at multiples of eval_steps (DefaultFlowCallback.on_step_end), so the last
        # step's checkpoint is never a candidate for the best model unless eval_at_end; it is still saved, for
        # the record and as the export when no eval ever ran.
        if step and cfg.eval_at_end and not any(e["step"] == step for e in self.state["eval_history"]):
            self._eval_and_record()
        if step and not any(s == step for s, _ in ckpt.list_checkpoints(self.checkpoint_dir)):
            self.save_checkpoint()
        self.ledger.end_session(step, outcome, plan)
        self.session_tokens_per_s = session_tokens / max(time.time() - session_t0, 1e-9)
        return outcome

    # ---- outputs -----------------------------------------------------------------------------------------
    def finalize(self, outcome: str) -> TrainResult:
        """Copy the best checkpoint's adapter to train/adapter/ (load_best_model_at_end) and write the plot."""
        checkpoints = dict(ckpt.list_checkpoints(self.checkpoint_dir))
        if not checkpoints:
            raise TrainError("training ended without a checkpoint: nothing to export")
        chosen = self.state["best_step"] if self.train_cfg.load_best_model_at_end else max(checkpoints)
        if chosen not in checkpoints:
            chosen = max(checkpoints)
        with atomic_directory(self.out_dir / ADAPTER) as tmp:
            for file in (checkpoints[chosen] / ckpt.ADAPTER).iterdir():
                shutil.copy2(file, tmp / file.name)
            chosen_loss = next((e["eval_loss"] for e in self.state["eval_history"] if e["step"] == chosen), None)
            atomic_write_json(tmp / "birbal_adapter.json", {"step": chosen, "eval_loss": chosen_loss,
                                                            "recipe": self.cfg.name})
        records = self.metrics.records()
        plot_loss(records, self.out_dir / LOSS_PLOT, f"{self.cfg.name}: QLoRA training")
        train_losses = [r["loss"] for r in records if r.get("event") == "train"]
        ledger = self.ledger.summary()
        details = {
            "outcome": outcome, "global_step": self.state["global_step"], "total_steps": self.total_steps,
            "tokens_seen": self.state["tokens_seen"], "best_step": chosen,
            "best_eval_loss": self.state["best_eval_loss"], "eval_history": self.state["eval_history"],
            "first_train_loss": train_losses[0] if train_losses else None,
            "final_train_loss": train_losses[-1] if train_losses else None,
            "budget_hours": self.train_cfg.budget_hours, "budget_used_s": ledger["used_s"],
            "sessions": ledger["sessions"], "time_lost_to_crashes_s": ledger["time_lost_to_crashes_s"],
            "budget_overrun_s": ledger["budget_overrun_s"], "last_step_plan": ledger["last_plan"],
            "max_gpu_memory_gib": self.train_cfg.max_gpu_memory_gib, "peak_gpu_memory_gib": peak_gpu_memory_gib(),
            "device": str(self.device), "train_examples": len(self.train_examples),
            "micro_batches_per_epoch": self.plan.epoch_micro_batches, "bins_per_epoch": self.plan.bins_per_epoch,
            "packing_efficiency_estimate": self.plan.efficiency, "eval_micro_batches": len(self.eval_rows),
            "dropped_too_long": self.dropped_too_long,
            "session_tokens_per_s": round(self.session_tokens_per_s, 1),
            "trainable_parameters": sum(p.numel() for p in self.trainable),
        }
        outputs = {f"{ADAPTER}/{k}": v for k, v in hash_tree(self.out_dir / ADAPTER).items()}
        records_and_plot = hash_tree(self.out_dir, exclude=(CHECKPOINTS, ADAPTER))
        outputs.update({name: records_and_plot[name] for name in (METRICS, LEDGER, LOSS_PLOT)})
        return TrainResult(outcome=outcome, outputs=outputs, details=details)

    def cleanup(self) -> None:
        if getattr(self, "neftune", None):  # absent when setup() failed before building the model
            self.neftune.remove()
