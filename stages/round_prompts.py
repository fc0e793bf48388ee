"""Stage round_prompts: the train prompts of round k >= 2 (params rounds.prompts; see alignpipe.round_prompts)."""

from __future__ import annotations

from pathlib import Path

from alignpipe.cli import stage_main, stage_parser
from alignpipe.params import load_section
from alignpipe.round_prompts import RoundPromptsPaths, run


@stage_main
def main() -> None:
    parser = stage_parser(__doc__, "rounds")
    parser.add_argument("--round", required=True, help="the round, a rounds.extra key (round-2, ...)")
    parser.add_argument("--prompts", type=Path, required=True, help="the train prompts (prepare's)")
    parser.add_argument("--out", type=Path, required=True, help="the round's prompts parquet")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    run(load_section("rounds", args.params), RoundPromptsPaths(args.round, args.prompts, args.out))


if __name__ == "__main__":
    main()
