"""Triton kernels. Installed as ``fastcompress.triton_kernels`` (Triton ships its own
top-level ``triton_kernels`` package, so ours must never be importable under that name)."""
