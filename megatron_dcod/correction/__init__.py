"""Corrective weights and the losses they multiply (docs/method.md)."""
