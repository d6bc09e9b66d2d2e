"""The GPT student: Megatron-Core specs built from an HF config (docs/design.md §5)."""
