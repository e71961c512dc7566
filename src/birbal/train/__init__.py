"""The train stage: 4-bit QLoRA on packed rows, inside a hard wall-clock budget, crash-safe."""
