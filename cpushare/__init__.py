"""CPUShare: a global market for CPU time."""

__version__ = "0.1.0"
