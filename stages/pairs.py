"""Stage `pairs`: preference pairs and unpaired (KTO) examples from the scored samples, split by prompt
(params section `pairs`)."""

from __future__ import annotations

from pathlib import Path

from alignpipe.cli import stage_main, stage_parser
from alignpipe.pairs.stage import PairsPaths, run
from alignpipe.params import load_section


@stage_main
def main() -> None:
    parser = stage_parser(__doc__, "pairs")
    parser.add_argument("--scored", required=True, help="scored parquet")
    parser.add_argument("--prompts", required=True, help="prompts parquet (the prompt messages)")
    parser.add_argument(
        "--prepared",
        required=True,
        help="prepared data folder (preferences.parquet, unpaired.parquet if any)",
    )
    parser.add_argument("--out-dir", required=True, help="folder for train.parquet and eval.parquet")
    parser.add_argument(
        "--unpaired-dir", required=True, help="folder for the unpaired (KTO) train.parquet and eval.parquet"
    )
    parser.add_argument("--report", required=True, help="report JSON (dvc metrics)")
    parser.add_argument("--plots-dir", required=True, help="folder for the rewards/margins/label histograms")
    parser.add_argument("--score-report", help="reports/score.json (the reward's name and version hash)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    paths = [
        Path(p) for p in (args.scored, args.prompts, args.prepared, args.out_dir, args.report, args.plots_dir)
    ]
    score_report = Path(args.score_report) if args.score_report else None
    unpaired = Path(args.unpaired_dir)
    run(
        load_section("pairs", args.params),
        PairsPaths(*paths, score_report=score_report, unpaired_dir=unpaired),
    )


if __name__ == "__main__":
    main()
