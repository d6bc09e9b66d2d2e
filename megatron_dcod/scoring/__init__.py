"""The Megatron-Core teacher scorer behind `python -m megatron_dcod.score`."""
