"""Stage prepare: data sources to conversational parquet files (see alignpipe.prepare)."""

from pathlib import Path

from alignpipe.cli import stage_main, stage_parser
from alignpipe.params import load_section
from alignpipe.prepare import PreparePaths, run


@stage_main
def main() -> None:
    parser = stage_parser(__doc__, "data")  # and evaluate.preferences (a held-out preference split)
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the prepared parquet files")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics json (row counts, drops)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    eval_preferences = load_section("evaluate", args.params).preferences
    run(load_section("data", args.params), PreparePaths(args.out_dir, args.metrics), eval_preferences)


if __name__ == "__main__":
    main()
