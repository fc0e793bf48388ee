"""Stage sft: fine-tune the base model on the SFT demonstrations (see alignpipe.sft.stage).

Runs as `python stages/sft.py ...` or under `accelerate launch --config_file configs/accelerate/<x>.yaml`
(params.yaml: sft.launcher).
"""

from pathlib import Path

from alignpipe.cli import stage_main, stage_parser
from alignpipe.params import load_section
from alignpipe.sft.stage import SftPaths, run


@stage_main
def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0], "sft")
    parser.add_argument("--model", required=True, type=Path, help="base model folder")
    parser.add_argument("--data", required=True, type=Path, help="sft.parquet")
    parser.add_argument("--out", required=True, type=Path, help="output model folder (merged HF model)")
    parser.add_argument("--checkpoints", required=True, type=Path, help="checkpoint folder (resume point)")
    parser.add_argument(
        "--metrics-dir", required=True, type=Path, help="DVCLive folder (metrics.json, plots)"
    )
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    paths = SftPaths(args.model, args.data, args.out, args.checkpoints, args.metrics_dir)
    run(load_section("sft", args.params), paths)


if __name__ == "__main__":
    main()
