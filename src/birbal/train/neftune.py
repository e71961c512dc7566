"""NEFTune noise scaled per example, not per packed row.

NEFTune adds uniform noise of magnitude alpha / sqrt(L * d) to the input embeddings while training, L being the
example's length. transformers' and TRL's hooks take L from the tensor's sequence dimension, which with packing
is the whole row (8192): every example then gets noise up to sqrt(8192 / L) times too small. This hook reads each
token's own example length instead. Padding tokens (length 0) get no noise.
"""

from __future__ import annotations

import torch


class PerExampleNEFTune:
    def __init__(self, embedding: torch.nn.Module, alpha: float):
        self.alpha = alpha
        self.example_length: torch.Tensor | None = None  # (batch, seq) set before each forward
        self.handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training or self.example_length is None or self.alpha <= 0:
            return output
        lengths = self.example_length.to(output.device, torch.float32)
        dims = output.shape[-1]
        scale = torch.where(lengths > 0, self.alpha / torch.sqrt(lengths.clamp(min=1) * dims),
                            torch.zeros_like(lengths))
        noise = torch.empty_like(output, dtype=torch.float32).uniform_(-1.0, 1.0) * scale.unsqueeze(-1)
        return output + noise.to(output.dtype)

    def remove(self) -> None:
        self.handle.remove()
