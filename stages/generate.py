"""Stage ``generate``: N sampled completions per train prompt (best-of-N), sharded and resumable.

    python stages/generate.py --model models/sft --prompts data/prepared/prompts.parquet \
        --out data/generations --metrics reports/generate.json [--shard I]

``--shard I`` runs shard I of ``generate.num_shards`` only (on another GPU or machine);
see ``alignpipe.generate`` for how shards are combined.
"""

from __future__ import annotations

from pathlib import Path

from alignpipe.cli import stage_main, stage_parser
from alignpipe.generate import GeneratePaths, run
from alignpipe.params import for_round, load_section


@stage_main
def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0], "generate")
    parser.add_argument("--model", required=True, help="policy model folder (models/sft)")
    parser.add_argument("--prompts", required=True, help="prompts parquet (schema PROMPTS)")
    parser.add_argument("--out", required=True, help="output folder of chunk parquet files")
    parser.add_argument("--metrics", default=None, help="metrics JSON (throughput, lengths)")
    parser.add_argument(
        "--shard", type=int, default=None, help="run only this shard (0-based) of generate.num_shards"
    )
    parser.add_argument("--rated", type=Path, help="rated.parquet of prepare: rows there skip sampling")
    parser.add_argument("--round", help="round k >= 2 (a rounds.extra key): its generate overrides apply")
    parser.add_argument("--params", default="params.yaml", help="params file")
    args = parser.parse_args()
    metrics = Path(args.metrics) if args.metrics else None
    paths = GeneratePaths(Path(args.model), Path(args.prompts), Path(args.out), metrics, args.rated)
    run(for_round(load_section("generate", args.params), args.round, args.params), paths, shard=args.shard)


if __name__ == "__main__":
    main()
