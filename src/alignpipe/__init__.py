"""alignpipe: a reproducible preference-alignment pipeline (SFT -> best-of-N -> DPO)."""

__version__ = "0.1.0"
