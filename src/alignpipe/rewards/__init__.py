"""Rewards: one interface (base), three kinds (builtin, hf, python), chosen in load."""
