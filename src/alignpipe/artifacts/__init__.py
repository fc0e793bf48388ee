"""Artifacts: every format that crosses a stage boundary, and how files are written (atomically)."""
