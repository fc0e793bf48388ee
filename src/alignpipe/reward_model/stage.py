"""The ``reward_model`` stage: train a Bradley-Terry reward model when ``reward.kind: trained``.

The stage is always in the DAG, between ``sft`` and ``score``: with another ``reward.kind`` it
writes a constant marker folder in a second (``models/reward/NOT_TRAINED.json``), so ``score``
stays cached whatever the ``reward_model`` params; with ``trained`` it trains on the pairs of
``alignpipe.reward_model.data``, writes ``models/reward`` (a one-output sequence-classification
folder with the tokenizer and its chat template, which transformers and ``reward.kind: hf`` load
unchanged), then scores the held-out pairs through the ``hf`` reward path for the checks of
``alignpipe.reward_model.checks`` (``reports/reward_model.json``, the calibration table).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.artifacts.io import atomic_path, write_json
from alignpipe.core.chat import Message, require_chat_template
from alignpipe.core.models import load_tokenizer, seed_everything
from alignpipe.core.progress import Timer
from alignpipe.params import RewardModelParams
from alignpipe.reward_model.checks import calibration, pair_checks, verifier_agreement
from alignpipe.reward_model.data import RewardData, encode, load_pairs
from alignpipe.reward_model.train import RewardRun, load_model, mixed_precision, step_batches, train
from alignpipe.training.checkpoints import checkpoint_history, find_checkpoint, load_checkpoint
from alignpipe.training.fingerprint import fingerprint
from alignpipe.training.loop import build_optimizer, build_scheduler, save_model
from alignpipe.training.metrics import MetricsLog

MARKER = "NOT_TRAINED.json"
CALIBRATION = "calibration.csv"
CURVE = Path("plots") / "metrics" / "train" / "loss.tsv"


@dataclass(frozen=True)
class RewardModelPaths:
    """Where the stage reads and writes (``dvc.yaml`` passes them on the command line)."""

    sft: Path
    base: Path
    prepared: Path
    out: Path
    checkpoints: Path
    metrics_dir: Path
    report: Path


def run(params: RewardModelParams, paths: RewardModelPaths, reward_kind: str = "trained") -> dict[str, Any]:
    """The stage: train and check the reward model (``reward_kind`` trained), else write the marker."""
    if reward_kind != "trained":
        return not_trained(paths, reward_kind)
    summary = train_reward_model(params, paths)
    print(
        f"reward_model: held-out accuracy {summary['heldout']['accuracy']}, "
        f"mean margin {summary['heldout']['mean_margin']}",
        flush=True,
    )
    return summary


def train_reward_model(params: RewardModelParams, paths: RewardModelPaths) -> dict[str, Any]:
    from accelerate import Accelerator

    timer = Timer("reward_model")
    seed_everything(params.seed)
    start_dir = paths.sft if params.start_from == "sft" else paths.base
    tokenizer = load_tokenizer(start_dir)
    require_chat_template(tokenizer, None, where=str(start_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = load_pairs(params, paths.prepared)
    L = params.max_length
    encoded = [(encode(tokenizer, p.prompt, p.chosen, L), encode(tokenizer, p.prompt, p.rejected, L), p.margin)
               for p in data.train]  # fmt: skip
    acc = Accelerator(mixed_precision=mixed_precision(params), gradient_accumulation_steps=1)
    model = load_model(params, start_dir, pad_id)
    optimizer = build_optimizer(model, params)
    total = len(step_batches(len(encoded), params))
    scheduler = build_scheduler(optimizer, params, total)
    model, optimizer = acc.prepare(model, optimizer)
    used = "preferences.parquet" if data.source == "preferences" else "sft.parquet"
    fp = fingerprint(params, {"pairs": paths.prepared / used, "start model": start_dir}, acc.num_processes)
    if acc.is_main_process:
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        find_checkpoint(paths.checkpoints, fp, "reward_model")  # deletes stale ones
    acc.wait_for_everyone()
    found = find_checkpoint(paths.checkpoints, fp, "reward_model")
    start = load_checkpoint(acc, found, scheduler) if found else 0
    if found and acc.is_main_process:
        print(f"reward_model: resuming from {found} (step {start} of {total})", flush=True)
    log = MetricsLog(paths.metrics_dir, acc.is_main_process, checkpoint_history(found) if found else ())
    run_ = RewardRun(acc, model, optimizer, scheduler, encoded, pad_id, params)
    steps = train(run_, start, log, paths.checkpoints, fp)
    state = None if params.peft.enabled else acc.get_state_dict(model)
    summary: dict[str, Any] = {}
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        unwrapped.config.pad_token_id = pad_id
        save_model(unwrapped, state, tokenizer, paths.out)
        summary = {
            "trained": True,
            "start_from": params.start_from,
            "pairs_source": data.source,
            "train_pairs": len(data.train),
            "steps": steps,
            "resumed_from_step": start or None,
            "train_seconds": round(timer.seconds, 1),
            **check(params, paths, data),
        }
        summary["wall_seconds"] = round(timer.seconds, 1)
        write_json(summary, paths.report)
        log.close({k: v for k, v in summary["heldout"].items()})
        timer.summary(steps, "steps", heldout_accuracy=summary["heldout"]["accuracy"])
    acc.wait_for_everyone()
    return summary


def _text(messages: list[Message]) -> str:
    return messages[-1]["content"]


def check(params: RewardModelParams, paths: RewardModelPaths, data: RewardData) -> dict[str, Any]:
    """Score the held-out pairs (and samples) with ``paths.out`` loaded as ``reward.kind: hf`` does."""
    from alignpipe.rewards.hf import HFReward

    reward = HFReward(str(paths.out), max_length=params.max_length, batch_size=2 * params.batch_size,
                      dtype=params.dtype)  # fmt: skip
    try:
        n = len(data.eval)
        prompts = [p.prompt for p in data.eval] * 2
        texts = [_text(p.chosen) for p in data.eval] + [_text(p.rejected) for p in data.eval]
        values = [r.reward for r in reward.score(prompts, texts, [None] * len(texts))]
        out: dict[str, Any] = {"heldout": pair_checks(values[:n], values[n:])}
        diffs = [c - r for c, r in zip(values[:n], values[n:], strict=True)]
        out["calibration"] = calibration(diffs)
        if data.eval_samples:
            s = data.eval_samples
            got = reward.score([x.prompt for x in s], [_text(x.completion) for x in s], [None] * len(s))
            out["verifier_agreement"] = verifier_agreement(
                [x.prompt_id for x in s], [float(x.score or 0.0) for x in s], [r.reward for r in got]
            )
    finally:
        reward.close()
    write_calibration(out["calibration"], paths.metrics_dir / CALIBRATION)
    return out


def write_calibration(rows: list[dict[str, float]], path: Path) -> None:
    fields = ["bin", "abs_diff", "predicted", "fraction_correct", "pairs"]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def not_trained(paths: RewardModelPaths, reward_kind: str) -> dict[str, Any]:
    """``reward.kind`` is not ``trained``: a constant marker folder and empty reports, in a second."""
    with atomic_path(paths.out) as tmp:
        tmp.mkdir(parents=True)
        marker = {"trained": False, "why": "reward.kind is not 'trained'; score does not read this folder"}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    curve = paths.metrics_dir / CURVE
    curve.parent.mkdir(parents=True, exist_ok=True)
    curve.write_text("step\tloss\n")  # the dvc plots out exists and parses, empty
    write_json({"trained": False}, paths.metrics_dir / "metrics.json")
    write_calibration([], paths.metrics_dir / CALIBRATION)
    summary = {"trained": False, "reward_kind": reward_kind}
    write_json(summary, paths.report)
    print(
        f"reward_model: reward.kind is {reward_kind!r}, not 'trained': wrote the marker {paths.out}/{MARKER}"
    )
    return summary
