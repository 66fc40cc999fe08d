"""Streaming statistics collectors and range calibrators (used by the quantize pass)."""
