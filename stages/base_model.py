"""Stage base_model: write the starting model as an HF folder (see alignpipe.base_model)."""

from pathlib import Path

from alignpipe.base_model import BaseModelPaths, run
from alignpipe.cli import stage_main, stage_parser
from alignpipe.params import load_section


@stage_main
def main() -> None:
    parser = stage_parser(__doc__, "base_model")
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    run(load_section("base_model", args.params), BaseModelPaths(args.out))


if __name__ == "__main__":
    main()
