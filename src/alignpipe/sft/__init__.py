"""The ``sft`` stage: supervised fine-tuning (stage) on demonstrations tokenized and batched in data."""
