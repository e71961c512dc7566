"""The export stage: check the adapter against the recipe, merge it into a bf16 base, checksum everything."""
