"""The data stage: sources, filters, the prompt template, the split and the data manifest."""
