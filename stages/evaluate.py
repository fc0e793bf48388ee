"""Stage `evaluate`: DPO vs SFT (and base) on held-out prompts and pairs (params `evaluate`, `reward`, `dpo`)."""

from __future__ import annotations

import argparse

from alignpipe.cli import stage_main
from alignpipe.evaluate.stage import run_evaluate
from alignpipe.params import load_section


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sft", required=True, help="SFT model folder")
    parser.add_argument("--dpo", required=True, help="DPO model folder")
    parser.add_argument("--base", required=True, help="base model folder (read when evaluate.include_base)")
    parser.add_argument("--prompts", required=True, help="eval prompts parquet")
    parser.add_argument("--pairs", required=True, help="eval pairs parquet")
    parser.add_argument("--ref-logps", required=True, help="reference log-probs parquet")
    parser.add_argument("--out-dir", required=True, help="reports folder: eval.json, eval.md, eval/")
    parser.add_argument("--sft-curves", help="DVCLive plots folder of the sft stage")
    parser.add_argument("--dpo-curves", help="DVCLive plots folder of the dpo stage")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    curves = {k: v for k, v in (("sft", args.sft_curves), ("dpo", args.dpo_curves)) if v}
    run_evaluate(
        {"sft": args.sft, "dpo": args.dpo, "base": args.base},
        args.prompts,
        args.pairs,
        args.ref_logps,
        args.out_dir,
        load_section("evaluate", args.params),
        load_section("reward", args.params),
        load_section("dpo", args.params),
        curves=curves,
    )


if __name__ == "__main__":
    main()
