"""megatron-dcod: distribution-corrected offline distillation of reasoning traces."""

__version__ = "0.1.0"
