"""The ``pairs`` stage: preference pairs (build) and unpaired KTO examples (unpaired) from the scored samples (stage)."""
