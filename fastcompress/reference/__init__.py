"""Plain-torch references: the test oracle, the CPU fallback and the benchmark baseline."""

from fastcompress.reference.mcq import (
    mcq_entropy_loss_reference,
    mcq_quantize_reference,
    mcq_search_reference,
)

__all__ = ["mcq_entropy_loss_reference", "mcq_quantize_reference", "mcq_search_reference"]
