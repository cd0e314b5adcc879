"""Kernels and their thin wrappers; every op has a plain-torch reference."""
