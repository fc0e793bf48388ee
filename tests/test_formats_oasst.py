"""OpenAssistant trees (oasst1/oasst2), nested and flat, from hand-written fixtures.

The fixtures follow the oasst-data README and the oasst1 dataset card: trees of
prompter/assistant messages with ``rank`` among siblings (0 = best), ``lang``, ``deleted`` and
``review_result``. ``oasst_trees.jsonl`` holds three trees:

- "Why can't we divide by 0?" (en): A1 (rank 0) -> "Can you explain it with limits?" -> A3 (0),
  A4 (1), A5 (1, a tie with A4); A2 (1); a deleted reply (with a reply under it); a reply with
  ``review_result: false``.
- "Wie heißt die Hauptstadt von Österreich?" (de): two replies tied at rank 0.
- "Tell me a joke about cats." (en): an empty reply (rank 0), a joke (rank 1) with an unanswered
  follow-up.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from formats_helpers import asst, first_error, fixture, jsonl, read, user

TREES = fixture("oasst_trees.jsonl")
FLAT = fixture("oasst_messages.jsonl")

DIVIDE = user("Why can't we divide by 0?")
A1 = asst(
    "Because no number times 0 gives a non-zero result, so x/0 has no answer. As x → 0⁺, 1/x grows without "
    "bound (→ ∞)."
)
A2 = asst("It is undefined.")
LIMITS = user("Can you explain it with limits?")
A3 = asst("lim_{x→0⁺} 1/x = +∞ but lim_{x→0⁻} 1/x = −∞; the two sides disagree, so 1/0 is undefined.")
A4 = asst("Limits show that the value blows up.")
A5 = asst("Division by zero is simply undefined.")
VIENNA = user("Wie heißt die Hauptstadt von Österreich?")
JOKE = user("Tell me a joke about cats.")
CAT = asst("Why did the cat sit on the computer? To keep an eye on the mouse! 🐭")
# one deleted reply (and the prompter message under it), one review-rejected, one empty
CLEANED = {"deleted": 1, "reply_to_dropped": 1, "review_rejected": 1, "empty_text": 1}


def test_sft_follows_the_best_ranked_path_of_each_tree() -> None:
    rows, dropped, fmt = read(TREES, "sft")
    assert fmt == "oasst"
    assert rows == [
        {"prompt": [DIVIDE], "completion": [A1]},
        {"prompt": [DIVIDE, A1, LIMITS], "completion": [A3]},
        {"prompt": [VIENNA], "completion": [asst("Wien.")]},  # a tie at rank 0: the first in the file
        {"prompt": [JOKE], "completion": [CAT]},  # the empty rank-0 reply is dropped; the open follow-up cut
    ]
    assert dropped == CLEANED


def test_best_vs_worst_pairs_siblings_by_rank_with_the_conversation_as_prompt() -> None:
    rows, dropped, _ = read(TREES, "preferences")
    assert rows == [
        {"prompt": [DIVIDE], "chosen": [A1], "rejected": [A2]},
        # multi-turn prompt; worst of the tied rank-1 replies A4, A5 is the last (A5)
        {"prompt": [DIVIDE, A1, LIMITS], "chosen": [A3], "rejected": [A5]},
    ]
    assert dropped == {**CLEANED, "tie": 1}  # Wien.: both rank 0


def test_all_pairs_skips_and_counts_equal_ranks() -> None:
    rows, dropped, _ = read(TREES, "preferences", pairs="all_pairs")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [([A1], [A2]), ([A3], [A4]), ([A3], [A5])]
    assert dropped == {**CLEANED, "tie": 2}  # A4 = A5, and the two Wien. replies


def test_lang_filter_drops_other_languages_with_their_replies() -> None:
    rows, dropped, _ = read(TREES, "sft", lang=("en",))
    assert [r["prompt"][0] for r in rows] == [DIVIDE, DIVIDE, JOKE]
    assert dropped == {**CLEANED, "lang": 1, "reply_to_dropped": 3}


def test_prompts_are_the_initial_prompts() -> None:
    rows, _, _ = read(TREES, "prompts")
    assert rows == [{"prompt": [DIVIDE]}, {"prompt": [VIENNA]}, {"prompt": [JOKE]}]


def test_flat_messages_are_grouped_into_trees() -> None:
    """A reply before its parent, float ranks (HF parquet), and four bad rows, each counted."""
    rows, dropped, fmt = read(FLAT, "sft")
    prime = user("Is 1 a prime number?")
    assert fmt == "oasst"
    assert rows == [
        {"prompt": [VIENNA], "completion": [asst("Wien.")]},
        {"prompt": [JOKE], "completion": [CAT]},
        {
            "prompt": [prime],
            "completion": [asst("No — a prime has exactly two divisors, and 1 has only one.")],
        },
    ]
    assert dropped == {"wrong_type": 1, "missing_parent": 1, "bad_order": 1, "empty_text": 1, "deleted": 1}
    pairs, dropped, _ = read(FLAT, "preferences")
    assert pairs == [
        {
            "prompt": [prime],
            "chosen": [asst("No — a prime has exactly two divisors, and 1 has only one.")],
            "rejected": [asst("Yes.")],
        }
    ]
    assert dropped["tie"] == 1


def test_flat_bad_rows_name_file_line_and_field(tmp_path) -> None:
    assert first_error(FLAT, "sft") == f"{FLAT}: line 10: field 'rank': expected a number, got string"
    lines = Path(FLAT).read_text(encoding="utf-8").splitlines()
    orphan = jsonl(tmp_path / "orphan.jsonl", [json.loads(lines[10])])
    assert first_error(orphan, "sft") == (
        f"{orphan}: line 1: field 'parent_id': parent_id '00000000-dead-4bee-8000-000000000000' is not the "
        "message_id of any message in the file"
    )
    root = jsonl(tmp_path / "root.jsonl", [json.loads(lines[11])])
    assert first_error(root, "sft") == (
        f"{root}: line 1: field 'role': roles must alternate prompter, assistant from the initial prompt "
        "(parent_id null) down"
    )
    twice = jsonl(tmp_path / "twice.jsonl", [json.loads(lines[1]), json.loads(lines[1])])
    assert first_error(twice, "sft") == (
        f"{twice}: line 2: field 'message_id': message_id '8e2c4e70-9d5f-4b3c-8e0a-4f8192a3b4c5' repeats the "
        "message of line 1"
    )


def _flatten(node: dict) -> list[dict]:
    replies = node.get("replies") or []
    return [{k: v for k, v in node.items() if k != "replies"}] + [m for r in replies for m in _flatten(r)]


def test_flat_and_nested_forms_of_the_same_trees_agree(tmp_path) -> None:
    trees = [json.loads(line) for line in Path(TREES).read_text(encoding="utf-8").splitlines()]
    flat = jsonl(tmp_path / "flat.jsonl", [m for tree in trees for m in _flatten(tree["prompt"])])
    for kind in ("sft", "prompts", "preferences"):
        assert read(flat, kind) == read(TREES, kind)


def test_nested_tree_errors_name_the_message_path(tmp_path) -> None:
    tree = {
        "message_id": "p",
        "role": "prompter",
        "text": "q",
        "replies": [{"message_id": "a", "role": "user", "text": "x"}],
    }
    source = jsonl(tmp_path / "t.jsonl", [{"message_tree_id": "p", "prompt": tree}])
    assert first_error(source, "sft") == (
        f"{source}: line 1: field 'prompt.replies[0].role': role 'user' is not 'prompter' or 'assistant'"
    )
    tree["replies"] = [{"message_id": "a", "role": "prompter", "text": "x"}]
    source = jsonl(tmp_path / "t2.jsonl", [{"message_tree_id": "p", "prompt": tree}])
    assert first_error(source, "sft") == (
        f"{source}: line 1: field 'prompt.replies[0].role': roles must alternate prompter, assistant from the "
        "initial prompt down"
    )


def test_gzipped_exports_read_as_they_ship(tmp_path) -> None:
    """OpenAssistant ships ``*.trees.jsonl.gz``; a cut archive is one line naming the file."""
    data = Path(TREES).read_bytes()
    packed = tmp_path / "2023-04-12_oasst_ready.trees.jsonl.gz"
    packed.write_bytes(gzip.compress(data))
    assert read(str(packed), "preferences") == read(TREES, "preferences")
    cut = tmp_path / "cut.trees.jsonl.gz"
    cut.write_bytes(gzip.compress(data)[:200])
    message = first_error(str(cut), "sft")
    assert message.startswith(f"{cut}: cannot read file (") and "\n" not in message
