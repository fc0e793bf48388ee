"""Shared by the two training stages (sft, dpo): fingerprint, checkpoints, LoRA, metrics, precision."""
