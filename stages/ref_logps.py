"""Stage ref_logps: reference log-probs of every pair under models/sft (see alignpipe.ref_logps)."""

from __future__ import annotations

from pathlib import Path

from alignpipe.cli import stage_main, stage_parser
from alignpipe.params import load_section
from alignpipe.ref_logps import RefLogpsPaths, RefLogpsSettings, run


@stage_main
def main() -> None:
    parser = stage_parser(__doc__, "ref_logps", "dpo")
    parser.add_argument("--model", type=Path, required=True, help="the reference (SFT) model folder")
    parser.add_argument(
        "--pairs", type=Path, required=True, help="folder with train.parquet and eval.parquet"
    )
    parser.add_argument("--out", type=Path, required=True, help="output parquet (schema.REF_LOGPS)")
    parser.add_argument("--metrics", type=Path, help="metrics json (pairs, tokens, truncation, seconds)")
    args = parser.parse_args()
    # of dpo it reads only dpo.max_length, dpo.max_prompt_length (the tokenization) and dpo.reference_free
    settings = RefLogpsSettings(load_section("ref_logps"), load_section("dpo"))
    run(settings, RefLogpsPaths(args.model, args.pairs, args.out, args.metrics))


if __name__ == "__main__":
    main()
