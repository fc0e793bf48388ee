"""Stage ref_logps: reference log-probs of every pair under models/sft (see alignpipe.ref_logps)."""

from __future__ import annotations

from pathlib import Path

from alignpipe.cli import stage_main, stage_parser
from alignpipe.params import for_round, load_section
from alignpipe.ref_logps import RefLogpsPaths, RefLogpsSettings, run


@stage_main
def main() -> None:
    parser = stage_parser(__doc__, "ref_logps", "dpo", "rounds")
    parser.add_argument("--model", type=Path, required=True, help="the reference (SFT) model folder")
    parser.add_argument(
        "--pairs", type=Path, required=True, help="folder with train.parquet and eval.parquet"
    )
    parser.add_argument("--out", type=Path, required=True, help="output parquet (schema.REF_LOGPS)")
    parser.add_argument("--metrics", type=Path, help="metrics json (pairs, tokens, truncation, seconds)")
    parser.add_argument(
        "--unpaired",
        type=Path,
        help="folder of unpaired examples (read with ref_logps.unpaired; may be missing)",
    )
    parser.add_argument("--out-unpaired", type=Path, help="output parquet (schema.REF_LOGPS_UNPAIRED)")
    parser.add_argument("--round", help="round k >= 2 (a rounds.extra key): its dpo overrides apply")
    parser.add_argument("--previous", type=Path, help="round k >= 2: its starting policy (rounds.reference)")
    args = parser.parse_args()
    # of dpo it reads only the tokenization lengths, dtype, peft and reference_free (not loss_type)
    settings = RefLogpsSettings(load_section("ref_logps"), for_round(load_section("dpo"), args.round))
    previous = args.round is not None and load_section("rounds").reference == "previous"
    model = args.previous if previous else args.model
    paths = RefLogpsPaths(model, args.pairs, args.out, args.metrics, args.unpaired, args.out_unpaired)
    run(settings, paths)


if __name__ == "__main__":
    main()
