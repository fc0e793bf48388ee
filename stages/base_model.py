"""Stage base_model: write the starting model as an HF folder (see alignpipe.base_model)."""

import argparse

from alignpipe.base_model import build_base_model
from alignpipe.cli import stage_main
from alignpipe.params import load_section


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    build_base_model(load_section("base_model", args.params), args.out)


if __name__ == "__main__":
    main()
