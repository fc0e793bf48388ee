"""The ``dpo`` stage: preference optimisation (stage) on pairs joined with their reference log-probs (data)."""
