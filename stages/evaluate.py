"""Stage `evaluate`: DPO vs SFT (and base) on held-out prompts and pairs (params `evaluate`, `reward`, `dpo`)."""

from __future__ import annotations

from pathlib import Path

from alignpipe.cli import stage_main, stage_parser
from alignpipe.evaluate.stage import EvaluatePaths, EvaluateSettings, run
from alignpipe.params import load_section


@stage_main
def main() -> None:
    parser = stage_parser(__doc__, "evaluate", "reward", "dpo", "rounds")
    parser.add_argument("--sft", required=True, help="SFT model folder")
    parser.add_argument("--dpo", required=True, help="the last round's DPO model folder (rounds.final)")
    parser.add_argument("--base", required=True, help="base model folder (read when evaluate.include_base)")
    parser.add_argument("--prompts", required=True, help="eval prompts parquet")
    parser.add_argument("--pairs", required=True, help="eval pairs parquet")
    parser.add_argument("--ref-logps", required=True, help="reference log-probs parquet")
    parser.add_argument("--out-dir", required=True, help="reports folder: eval.json, eval.md, eval/")
    parser.add_argument("--sft-curves", help="DVCLive plots folder of the sft stage")
    parser.add_argument("--dpo-curves", help="DVCLive plots folder of the dpo stage")
    parser.add_argument("--reward-model", help="the reward_model stage's folder (reward.kind: trained)")
    parser.add_argument("--sft-data", help="prepared SFT demonstrations parquet (the forgetting signal)")
    parser.add_argument("--preferences", type=Path, help="held-out preference split (evaluate.preferences)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    folders = [Path(p) for p in (args.sft, args.dpo, args.base, args.prompts, args.pairs, args.ref_logps)]
    curves = [Path(p) if p else None for p in (args.sft_curves, args.dpo_curves)]
    reward_model = Path(args.reward_model) if args.reward_model else None
    sft_data = Path(args.sft_data) if args.sft_data else None
    paths = EvaluatePaths(
        *folders, Path(args.out_dir), *curves, reward_model=reward_model, sft_data=sft_data,
        preferences=args.preferences,
    )  # fmt: skip
    settings = EvaluateSettings(
        load_section("evaluate", args.params),
        load_section("reward", args.params),
        load_section("dpo", args.params),
        load_section("rounds", args.params),
    )
    run(settings, paths)


if __name__ == "__main__":
    main()
