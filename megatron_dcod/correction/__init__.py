"""Corrective weights and the losses they multiply (METHOD.md)."""
