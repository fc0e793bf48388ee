"""The ``evaluate`` stage: DPO vs SFT (and base) on held-out prompts and pairs (stage), its reports (report)."""
