"""torch.nn modules."""
