"""The GPT student: Megatron-Core specs built from an HF config (DESIGN.md §5)."""
