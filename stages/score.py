"""Stage `score`: a reward for every generated completion (params section `reward`)."""

from __future__ import annotations

from pathlib import Path

from alignpipe.cli import stage_main, stage_parser
from alignpipe.params import load_section
from alignpipe.score import ScorePaths, run


@stage_main
def main() -> None:
    parser = stage_parser(__doc__, "reward")
    parser.add_argument("--generations", required=True, help="folder of generation parquet shards")
    parser.add_argument("--prompts", required=True, help="prompts parquet (prompt messages and meta)")
    parser.add_argument("--out", required=True, help="scored parquet to write")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--reward-model", type=Path, help="the reward_model stage's folder (kind: trained)")
    parser.add_argument("--rated", type=Path, help="rated.parquet of prepare: rows there are imported")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    paths = ScorePaths(
        Path(args.generations),
        Path(args.prompts),
        Path(args.out),
        Path(args.metrics),
        args.reward_model,
        args.rated,
    )
    run(load_section("reward", args.params), paths)


if __name__ == "__main__":
    main()
