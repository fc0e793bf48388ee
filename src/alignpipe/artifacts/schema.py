"""Artifact schemas, written down once.

Messages are lists of ``{"role": str, "content": str}`` dicts (TRL's
conversational format). ``meta`` columns hold a JSON string (the built-in
task's constraint spec) or null for user data.
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
# A VLM row's images: encoded bytes (png, jpeg, ...) and the source path, the layout `datasets` gives an
# `Image` feature in parquet; they belong before the text of the prompt's first user message (TRL's place).
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
IMAGES = pa.list_(IMAGE)


def with_images(schema: pa.Schema) -> pa.Schema:
    """``schema`` plus the ``images`` column, for a table whose rows carry images (VLM data)."""
    return schema.append(pa.field("images", IMAGES))


# data/prepared/sft.parquet: a prompt (messages) and its assistant completion (messages).
SFT = pa.schema([("id", pa.string()), ("prompt", MESSAGES), ("completion", MESSAGES), ("meta", pa.string())])

# data/prepared/{prompts,eval_prompts}.parquet
PROMPTS = pa.schema([("prompt_id", pa.string()), ("prompt", MESSAGES), ("meta", pa.string())])

# data/prepared/preferences.parquet: user-supplied pairs (chosen/rejected are assistant messages).
PREFERENCES = pa.schema(
    [("pair_id", pa.string()), ("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES)]
)

# data/generations/*.parquet: one row per sample; completion is the assistant text.
GENERATIONS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("completion", pa.string()),
        ("n_tokens", pa.int32()),
        ("finish_reason", pa.string()),  # "stop" | "length"
        ("logprob", pa.float64()),  # cumulative log-prob of the sample, null where the backend has none
        ("backend", pa.string()),
        ("seed", pa.int64()),
    ]
)

# data/scored.parquet: generations + reward; reward_details is a JSON string.
SCORED = pa.schema(
    list(GENERATIONS) + [pa.field("reward", pa.float64()), pa.field("reward_details", pa.string())]
)

# data/prepared/rated.parquet: the completions of a rated set (data.rated) with their reward by
# data.rated.rating; reward_details holds the format, the rule, the model and every raw score, as JSON.
# Always written (no rows without data.rated): generate and score read it to know whether to skip.
RATED = pa.schema(
    [
        ("prompt_id", pa.string()),  # of prompts.parquet
        ("sample_idx", pa.int32()),  # the completion's place among its prompt's rated completions
        ("completion", pa.string()),
        ("reward", pa.float64()),
        ("reward_details", pa.string()),
    ]
)

# data/pairs/{train,eval}.parquet
PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("chosen_reward", pa.float64()),  # null for user pairs
        ("rejected_reward", pa.float64()),
        ("margin", pa.float64()),
        ("source", pa.string()),  # "generated" | "user"
    ]
)

# data/ref_logps.parquet: reference (SFT) summed log-probs of each pair's completions.
REF_LOGPS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("ref_chosen_logps", pa.float64()),
        ("ref_rejected_logps", pa.float64()),
        ("chosen_tokens", pa.int32()),
        ("rejected_tokens", pa.int32()),
    ]
)

# data/prepared/unpaired.parquet: user-supplied unpaired feedback (KTO): one assistant completion and
# its thumbs-up (label true: desirable) or thumbs-down (false: undesirable).
UNPAIRED_PREPARED = pa.schema(
    [("example_id", pa.string()), ("prompt", MESSAGES), ("completion", MESSAGES), ("label", pa.bool_())]
)

# data/unpaired/{train,eval}.parquet: labelled single completions for KTO, from the scored samples
# (labels from their rewards, pairs.unpaired) and from data/prepared/unpaired.parquet.
UNPAIRED = pa.schema(
    [
        ("example_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", MESSAGES),
        ("completion", MESSAGES),
        ("label", pa.bool_()),  # true: desirable
        ("reward", pa.float64()),  # null for user rows
        ("source", pa.string()),  # "generated" | "user"
    ]
)

# data/ref_logps_unpaired.parquet: reference summed log-probs of each unpaired completion, and of the
# mismatched completion (another prompt's, fixed per example: kl_example_id) that KTO's KL point uses.
REF_LOGPS_UNPAIRED = pa.schema(
    [
        ("example_id", pa.string()),
        ("ref_logps", pa.float64()),
        ("tokens", pa.int32()),
        ("kl_example_id", pa.string()),
        ("ref_kl_logps", pa.float64()),
        ("kl_tokens", pa.int32()),
    ]
)
