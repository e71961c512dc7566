"""NEFTune: uniform noise of magnitude alpha / sqrt(L * d) added to the input embeddings while training.

Two scales (`train.neftune_scale`):

- "row" (birbal-4090, as upstream): L is the width of the micro-batch's tensor, `embed.size(1)`, the same for
  every token, padding included (their `monkeypatch/mistral_embeddings_hijack.py:19-24`, `dims = size(1) *
  size(2)`). With axolotl 0.3.0's sample packing a micro-batch is ONE packed row of up to micro_batch_size x
  sequence_len tokens padded to a multiple of sequence_len, so L is 8192 or 16384 whatever the examples' lengths.
- "example" (plus profile): L is the length of the token's own example, the scale NEFTune's paper defines for an
  unpacked example; padding (length 0) gets no noise. With packing, "row" gives an example of L tokens
  sqrt(row / L) times less noise than the paper's.
"""

from __future__ import annotations

from typing import Literal

import torch

Scale = Literal["row", "example"]


class NEFTune:
    def __init__(self, embedding: torch.nn.Module, alpha: float, scale: Scale = "row"):
        if scale not in ("row", "example"):
            raise ValueError(f"neftune scale must be 'row' or 'example', not {scale!r}")
        self.alpha = alpha
        self.scale = scale
        self.example_length: torch.Tensor | None = None  # (batch, seq), set before each forward ("example" only)
        self.handle = embedding.register_forward_hook(self._hook)

    def magnitude(self, output: torch.Tensor) -> torch.Tensor:
        """The noise bound per token, shaped (batch, seq)."""
        batch, width, dims = output.shape
        if self.scale == "row":
            return torch.full((batch, width), self.alpha / (width * dims) ** 0.5, device=output.device)
        if self.example_length is None:
            raise ValueError("NEFTune scale 'example' needs example_length set before the forward")
        lengths = self.example_length.to(output.device, torch.float32)
        return torch.where(lengths > 0, self.alpha / torch.sqrt(lengths.clamp(min=1) * dims),
                           torch.zeros_like(lengths))

    def _hook(self, module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training or self.alpha <= 0:
            return output
        scale = self.magnitude(output)
        noise = torch.empty_like(output, dtype=torch.float32).uniform_(-1.0, 1.0) * scale.unsqueeze(-1)
        return output + noise.to(output.dtype)

    def remove(self) -> None:
        self.handle.remove()


class PerExampleNEFTune(NEFTune):
    """The "example" scale (kept under its old name for the benchmarks)."""

    def __init__(self, embedding: torch.nn.Module, alpha: float):
        super().__init__(embedding, alpha, scale="example")
