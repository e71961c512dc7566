"""The optimisation recipe, the checkpoint policy and the wall-clock budget."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from birbal.config.base import Section


class TrainConfig(Section):
    seed: int = Field(description="Seeds data order, LoRA init, dropout and NEFTune noise (upstream: HF Trainer's "
                                  "default 42, nips_02 leaving `#seed: 57` commented out).")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sequence_len: int = Field(gt=0, description="Tokens per packed row.")
    sample_packing: bool = True
    pad_to_sequence_len: bool = True
    micro_batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(gt=0)
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = "paged_adamw_32bit"
    learning_rate: float = Field(gt=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0.0)
    max_grad_norm: float = Field(gt=0.0)
    adam_beta1: float = Field(0.9, gt=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, gt=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    num_epochs: float = Field(gt=0.0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimiser steps (None: epochs).")
    neftune_noise_alpha: float | None = Field(None, ge=0.0, description="NEFTune alpha; None turns it off.")
    # Fidelity switches (docs/FIDELITY.md): the first value of each is what the winners' code did, the default.
    tokenization: Literal["upstream", "joint"] = Field(
        "upstream", description="upstream: axolotl's prompt and answer tokenised apart by SentencePiece (the answer "
                                "gets a dummy-prefix '▁'); joint: question + answer in one call of the tokenizer, "
                                "as the server tokenises a prompt and its continuation.")
    neftune_scale: Literal["row", "example"] = Field(
        "row", description="row: alpha / sqrt(packed row width x d) for every token, as upstream; example: "
                           "alpha / sqrt(example length x d), NEFTune's own scale for each packed example.")
    loss_averaging: Literal["micro_batch_mean", "token_mean"] = Field(
        "micro_batch_mean", description="micro_batch_mean: the step's loss is the mean of its micro-batches' mean "
                                        "losses (HF Trainer 4.35); token_mean: every labelled token of the step "
                                        "weighs the same.")
    eval_loss_averaging: Literal["bin_mean", "token_mean"] = Field(
        "bin_mean", description="bin_mean: eval_loss is the mean of per-bin mean losses (HF evaluation_loop); "
                                "token_mean: every labelled eval token weighs the same.")
    epoch_length: Literal["estimate", "all_bins"] = Field(
        "estimate", description="estimate: each epoch yields axolotl's estimated number of bins and stops (a few "
                                "bins early); all_bins: every packed bin of every epoch is trained on.")
    sliding_window_keys: Literal["flash_attn", "transformers"] = Field(
        "flash_attn", description="flash_attn: a token sees itself and sliding_window tokens before it, as upstream's "
                                  "flash-attn 2.3 window did while training; transformers: sliding_window keys in "
                                  "all, transformers 5's mask.")
    eval_at_end: bool = Field(
        False, description="Also evaluate at the last step, making its checkpoint a candidate for the best model "
                           "(HF Trainer 4.35 evaluates only at multiples of eval_steps).")
    gradient_checkpointing: bool = True
    unchecked_layers: int = Field(
        0, ge=0, description="With gradient checkpointing, leave the last N decoder layers unchecked: their "
                             "activations stay in memory and their forward is not recomputed. Memory for speed; "
                             "the same maths.")
    offload_layers: int = Field(
        0, ge=0, description="With gradient checkpointing, this many of the checkpointed decoder layers (spread "
                             "evenly over them) are not checkpointed either: their saved activations go to pinned "
                             "host memory in the forward and come back in the backward, on copy streams beside the "
                             "compute (about 1.6 GiB of host RAM a layer at 16,384 tokens). PCIe for recompute; "
                             "the same maths.")
    down_proj_outside_checkpoint: bool = Field(
        False, description="With gradient checkpointing, each checkpointed decoder layer's last product (the frozen "
                           "4-bit down projection, a quarter of the layer's GEMM FLOPs) runs outside its "
                           "checkpoint, so the backward's recompute skips it: its output is the layer's output, "
                           "which no backward needs. Compute for nothing else; the same maths (bit for bit eager).")
    torch_compile: bool = Field(
        False, description="Compile each decoder layer with torch.compile (fuses the norm, rotary, LoRA and "
                           "activation element-wise work; the first steps pay the compile). GPU speed, not maths.")
    bf16: bool = True
    tf32: bool = False
    train_on_inputs: bool = Field(False, description="False: loss on the response tokens only.")
    eval_steps: int = Field(gt=0)
    eval_max_rows: int = Field(gt=0, description="Evaluate on the first N rows of the eval split.")
    save_steps: int = Field(gt=0)
    save_total_limit: int = Field(gt=0, description="Checkpoints kept (the best one is never deleted).")
    metric_for_best_model: Literal["eval_loss"] = "eval_loss"
    load_best_model_at_end: bool = True
    logging_steps: int = Field(1, gt=0)
    budget_hours: float = Field(gt=0.0, description="Hard wall-clock budget of training, across restarts.")
    max_gpu_memory_gib: float | None = Field(None, gt=0.0, description="Cap the process's GPU memory (GiB).")

    @model_validator(mode="after")
    def _checkpoint_policy(self) -> TrainConfig:
        if self.load_best_model_at_end and self.save_steps % self.eval_steps:
            raise ValueError("save_steps must be a multiple of eval_steps when load_best_model_at_end is on")
        return self
