"""Interop: reading released PyTorch weights without torch."""
