"""megatron-dcod: distribution-corrected offline distillation of reasoning traces on Megatron-Core."""

__version__ = "0.1.0"
