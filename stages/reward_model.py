"""Stage reward_model: train a Bradley-Terry reward model when reward.kind is trained (alignpipe.reward_model.stage).

With another reward.kind it only writes a marker folder, so score stays cached.
"""

import argparse
from pathlib import Path

from alignpipe.cli import stage_main
from alignpipe.params import load_section
from alignpipe.reward_model.stage import RewardModelPaths, run


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sft", required=True, type=Path, help="SFT model folder (reward_model.start_from: sft)"
    )
    parser.add_argument("--base", required=True, type=Path, help="base model folder (start_from: base)")
    parser.add_argument("--prepared", required=True, type=Path, help="data/prepared (sft, preferences)")
    parser.add_argument("--out", required=True, type=Path, help="output reward model folder")
    parser.add_argument("--checkpoints", required=True, type=Path, help="checkpoint folder (resume point)")
    parser.add_argument("--metrics-dir", required=True, type=Path, help="DVCLive folder, calibration.csv")
    parser.add_argument("--report", required=True, type=Path, help="reports/reward_model.json")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    paths = RewardModelPaths(
        args.sft, args.base, args.prepared, args.out, args.checkpoints, args.metrics_dir, args.report
    )
    kind = load_section("reward", args.params).kind
    run(load_section("reward_model", args.params), paths, reward_kind=kind)


if __name__ == "__main__":
    main()
