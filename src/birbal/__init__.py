"""birbal-repro: rebuild the NeurIPS 2023 LLM Efficiency Challenge RTX 4090 winner end to end."""

__version__ = "0.1.0"
