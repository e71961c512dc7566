"""birbal-repro: rebuild the NeurIPS 2023 LLM Efficiency Challenge RTX 4090 winner end to end."""

__version__ = "0.1.0"


def _quiet_unactionable_warnings() -> None:
    """bitsandbytes (0.49, 0.50) logs "Failed to load CPU gemm_4bit_forward from kernels-community" at every import
    on an AVX512-BF16 CPU without the optional `kernels` package; it then uses its own CPU kernel, so there is
    nothing to do about it. Only that message is dropped. (With `kernels` installed it would fetch that kernel from
    the hub instead: no install of this project carries it, tests/test_no_hub_at_import.py.)"""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward from kernels-community" not in str(record.msg))


_quiet_unactionable_warnings()
