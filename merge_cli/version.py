"""The version of merge-cli (what outputs and reports record)."""

__version__ = "0.1.0"
