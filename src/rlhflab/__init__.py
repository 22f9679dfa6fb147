"""rlhflab: RLHF and its alternatives, end to end, with honest measurement."""

__version__ = "0.1.0"
