"""Stage dpo: preference optimisation of models/sft on the train pairs, or the unpaired examples for
kto (see alignpipe.dpo.stage)."""

from __future__ import annotations

from pathlib import Path

from alignpipe.cli import stage_main, stage_parser
from alignpipe.dpo.stage import DpoPaths, run
from alignpipe.params import for_round, load_section


@stage_main
def main() -> None:
    parser = stage_parser(__doc__, "dpo")
    parser.add_argument(
        "--model", type=Path, required=True, help="the SFT model folder (start and reference)"
    )
    parser.add_argument(
        "--pairs", type=Path, required=True, help="folder with train.parquet and eval.parquet"
    )
    parser.add_argument("--ref-logps", type=Path, required=True, help="reference log-probs (ref_logps stage)")
    parser.add_argument("--unpaired", type=Path, help="folder of unpaired examples (kto, apo_zero_unpaired)")
    parser.add_argument("--ref-logps-unpaired", type=Path, help="their reference log-probs (ref_logps stage)")
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    parser.add_argument("--checkpoints", type=Path, required=True, help="resumable checkpoints (persist)")
    parser.add_argument(
        "--metrics-dir", type=Path, required=True, help="DVCLive folder (metrics.json, plots)"
    )
    parser.add_argument("--round", help="round k >= 2 (a rounds.extra key): its dpo overrides apply")
    args = parser.parse_args()
    paths = DpoPaths(args.model, args.pairs, args.ref_logps, args.out, args.checkpoints, args.metrics_dir,
                     args.unpaired, args.ref_logps_unpaired)  # fmt: skip
    run(for_round(load_section("dpo"), args.round), paths)


if __name__ == "__main__":
    main()
