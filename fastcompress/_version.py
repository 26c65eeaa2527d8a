"""The package version, at the bottom floor (the probe store keys verdicts by it)."""

__version__ = "0.1.0"
