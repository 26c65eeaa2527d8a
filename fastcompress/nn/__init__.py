"""torch.nn modules."""

from fastcompress.nn.mcq import CodebookEntry, MultiCodebookQuantizer

__all__ = ["CodebookEntry", "MultiCodebookQuantizer"]
