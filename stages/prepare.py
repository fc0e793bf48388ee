"""Stage prepare: data sources to conversational parquet files (see alignpipe.prepare)."""

import argparse

from alignpipe.cli import stage_main
from alignpipe.params import load_section
from alignpipe.prepare import prepare


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", required=True, help="folder for the prepared parquet files")
    parser.add_argument("--metrics", required=True, help="metrics json (row counts, drops)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    prepare(load_section("data", args.params), args.out_dir, args.metrics)


if __name__ == "__main__":
    main()
