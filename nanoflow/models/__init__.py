"""Model library: one file per architecture on shared layers; see registry.py and docs/adding-a-model.md."""
