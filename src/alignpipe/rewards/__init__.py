"""Rewards: one interface (base), three kinds (builtin, hf, python); load builds the configured one."""
