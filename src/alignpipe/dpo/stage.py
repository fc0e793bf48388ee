"""The ``dpo`` stage: preference optimisation of ``models/sft`` on the train pairs (an unpaired
``dpo.loss_type``, kto or apo_zero_unpaired: on the unpaired examples, :mod:`alignpipe.dpo.kto`).

The policy is the only model in memory: reference log-probs come from
``data/ref_logps.parquet`` unless ``dpo.reference: live`` (TR-DPO, Gorbatovski et al. 2024,
syncs that live reference: ``ref <- alpha * policy + (1 - alpha) * ref`` every k steps).
The loop runs on accelerate (``accelerate launch`` with configs/accelerate/*.yaml). The loss of a
step is the mean over the pairs of its global batch: each micro-batch contributes its per-pair
sum divided by the global batch size, so uneven micro-batches weigh each pair the same.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignpipe.artifacts.pairs import DPO_LENGTH_KEYS, count_truncation
from alignpipe.core.chat import require_chat_template
from alignpipe.core.logprobs import CompletionScorer, pack_row_tokens, shares_prompt
from alignpipe.core.models import enable_activation_checkpointing, load_tokenizer, seed_everything
from alignpipe.core.progress import Timer
from alignpipe.core.router import router_weight
from alignpipe.dpo import kto
from alignpipe.dpo.data import epoch_batches, file_batches, load_split, micro_batches, steps_per_epoch
from alignpipe.dpo.diagnostics import PairTracker, pair_margins, report
from alignpipe.dpo.early_stop import EarlyStopper
from alignpipe.dpo.run import (
    SUMMED,
    DpoRun,
    LoopOptions,
    StepStats,
    batch_logps,
    check_loss,
    metric_sums,
    optimizer_step,
    pair_losses,
)
from alignpipe.dpo.tr_dpo import sync_reference
from alignpipe.dpo.vision import (
    check_vision_dpo,
    load_vision_policy,
    load_vision_reference,
    load_vision_split,
    load_vision_unpaired_split,
    vision_peft,
)
from alignpipe.params import DpoParams
from alignpipe.training.checkpoints import (
    checkpoint_history,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from alignpipe.training.fingerprint import fingerprint
from alignpipe.training.launch import make_accelerator, prepare
from alignpipe.training.loop import Window, build_optimizer, build_scheduler, save_model
from alignpipe.training.metrics import MetricsLog
from alignpipe.training.numerics import Numerics, load_model, reference_scorer
from alignpipe.training.peft import apply_peft, unquantized_copy
from alignpipe.training.timed_save import SaveTimer
from alignpipe.vision.logprobs import VisionCompletionScorer
from alignpipe.vision.models import image_token_id, is_vision_model_folder, load_processor

DEFAULT_OPTIONS = LoopOptions()


def train_step(run: DpoRun, step: int, micros: list[list[int]], n_global: int) -> StepStats:
    """One optimizer step over this process's micro-batches (``n_global`` pairs over all processes)."""
    acc, p = run.accelerator, run.params
    # accelerate divides each backward by grad_accum and DDP averages over processes: undo both
    scale = acc.num_processes * p.grad_accum / n_global
    sums, tokens, bad, margins = None, 0, [], {}
    for i, index in enumerate(micros):
        sync = i == len(micros) - 1
        with contextlib.nullcontext() if sync else acc.no_sync(run.scorer):
            batch, policy, ref_c, ref_r = batch_logps(run, run.train, index)
            per_pair = pair_losses(policy, ref_c, ref_r, p)
            aux = acc.unwrap_model(run.scorer).aux_loss if run.router_coef else None
            router = run.router_coef * len(index) * aux if aux is not None else 0.0  # weighted like pairs
            acc.backward((per_pair.sum() + router) * scale)
        margins.update(pair_margins(batch.pair_ids, policy, ref_c, ref_r))
        bad += [
            pid for pid, ok in zip(batch.pair_ids, torch.isfinite(per_pair).tolist(), strict=True) if not ok
        ]
        part = metric_sums(policy, ref_c, ref_r, per_pair, p.beta)
        sums = part if sums is None else sums + part
        tokens += batch.n_tokens
    assert sums is not None
    sums = acc.reduce(torch.cat([sums, sums.new_tensor([tokens])]), reduction="sum").tolist()
    grad_norm, lr = optimizer_step(run, step, sums[len(SUMMED) + 1], bad, micros)
    named = dict(zip(SUMMED, sums, strict=False))
    return StepStats(named, int(sums[len(SUMMED)]), int(sums[-1]), grad_norm, lr, margins)


@torch.no_grad()
def evaluate(run: DpoRun) -> dict[str, float]:
    """Loss, reward accuracy and margin on the eval pairs (split over processes in equal batch counts)."""
    acc, data = run.accelerator, run.eval
    assert data is not None
    order = sorted(range(len(data)), key=lambda i: -data.pairs[i].n_tokens)
    batches = [order[i : i + run.params.batch_size] for i in range(0, len(order), run.params.batch_size)]
    mine = batches[acc.process_index :: acc.num_processes]
    rounds = -(-len(batches) // acc.num_processes)
    run.scorer.eval()
    sums = torch.zeros(len(SUMMED) + 2, device=acc.device)
    for r in range(rounds):  # a process without a batch left repeats one with weight 0 (collectives match)
        _, policy, ref_c, ref_r = batch_logps(run, data, mine[r] if r < len(mine) else batches[0])
        part = metric_sums(
            policy, ref_c, ref_r, pair_losses(policy, ref_c, ref_r, run.params), run.params.beta
        )
        sums += part if r < len(mine) else 0 * part
    run.scorer.train()
    sums = acc.reduce(sums, reduction="sum")
    n = max(float(sums[len(SUMMED)]), 1.0)
    mean = dict(zip(SUMMED, (sums[: len(SUMMED)] / n).tolist(), strict=True))
    return {f"eval/{k}": mean[k] for k in ("loss", "rewards/accuracies", "rewards/margins")}


def schedule(run: DpoRun, start: int) -> Any:
    """(step, this process's micro-batches, global batch size) for steps start+1..total; epochs repeat."""
    acc, p = run.accelerator, run.params
    lengths = [pair.n_tokens for pair in run.train.pairs]
    step, epoch = 0, 0
    while True:
        if run.options.data_order == "file":
            order = file_batches(len(lengths), run.global_size)
        else:
            order = epoch_batches(lengths, run.global_size, p.seed, epoch)
        for global_batch in order:
            micros = micro_batches(global_batch, acc.num_processes, acc.process_index, p.grad_accum)
            if micros is None:
                continue
            step += 1
            if step > run.total_steps:
                return
            if step > start:
                yield step, micros, len(global_batch)
        epoch += 1


def log_window(log: MetricsLog, step: int, window: Window, last: StepStats, unpaired: bool = False) -> None:
    """Means over the window's pairs (unpaired: TRL's KTO means); grad norm and learning rate of its
    last step; throughput."""
    n = max(window.pairs, 1)
    metrics = kto.means(window.sums) if unpaired else {k: window.sums[k] / n for k in SUMMED}
    metrics.update(grad_norm=last.grad_norm, learning_rate=last.learning_rate)
    metrics[f"{'examples' if unpaired else 'pairs'}_per_s"] = window.pairs / max(window.seconds, 1e-9)
    metrics["tokens_per_s"] = window.tokens / max(window.seconds, 1e-9)
    log.log(step, metrics)


def train(
    run: DpoRun, start: int, log: MetricsLog, checkpoints: Path, fp: dict[str, Any], found: Path | None = None
) -> dict[str, Any]:
    """The loop: step, sync the TR-DPO reference, log, evaluate (maybe stop early), checkpoint."""
    from tqdm.auto import tqdm

    p, acc = run.params, run.accelerator
    timer, window, pairs_seen, saver = Timer("dpo"), Window.empty(), 0, SaveTimer(p.save_minutes)
    stopper, tracker = EarlyStopper.from_history(p.early_stopping, log.history), PairTracker.resume(found)
    bar = tqdm(total=run.total_steps, initial=start, unit="step", desc="dpo", disable=not acc.is_main_process)
    step_fn, evaluate_fn = (kto.train_step, kto.evaluate) if p.unpaired else (train_step, evaluate)
    for step, micros, n_global in schedule(run, start):
        t0 = time.perf_counter()
        stats = step_fn(run, step, micros, n_global)
        window.add(stats.sums, stats.pairs, stats.tokens, time.perf_counter() - t0)
        pairs_seen += stats.pairs
        tracker.see(stats.margins)
        if p.ref_sync_steps and step % p.ref_sync_steps == 0:
            assert run.ref_scorer is not None
            sync_reference(acc.unwrap_model(run.scorer).model, run.ref_scorer.model, p.ref_sync_alpha)
        if step % p.logging_steps == 0 or step == run.total_steps:
            log_window(log, step, window, stats, p.unpaired)
            window = Window.empty()
        if run.eval is not None and (step % p.eval_steps == 0 or step == run.total_steps):
            log.log(step, metrics := evaluate_fn(run))
            if stopper.update(step, metrics):
                break  # early stopping: the final model is this step's
        if (step % p.save_steps == 0 or saver.due()) and step < run.total_steps:
            extra = tracker.synced_state()  # the main process saves the pairs every process saw
            save_checkpoint(acc, checkpoints, step, fp, run.scheduler, run.ref_scorer, log.history, extra)
            saver.restart()
        bar.update(1)
    bar.close()
    if stopper.stopped_at is not None and window.pairs:  # the steps since the last log, as at the end
        log_window(log, stopper.stopped_at, window, stats, p.unpaired)
    last = stopper.stopped_at or run.total_steps
    rows = "examples" if p.unpaired else "pairs"
    if acc.is_main_process:
        timer.summary(pairs_seen, rows, steps=last - start)
    rate = pairs_seen / max(timer.seconds, 1e-9)
    return {"steps": last, "resumed_from": start, f"train_{rows}": len(run.train),
            "train_seconds": round(timer.seconds, 2), f"train_{rows}_per_s": round(rate, 3),
            "early_stopping": stopper.summary(), "tracker": tracker}  # fmt: skip


def build_run(
    model_dir: Path,
    pairs_dir: Path,
    ref_logps: Path,
    params: DpoParams,
    options: LoopOptions = DEFAULT_OPTIONS,
    unpaired: tuple[Path, Path] | None = None,
) -> tuple[DpoRun, Any]:
    """Accelerator, data, policy (LoRA when asked), live reference, optimizer and scheduler.

    ``unpaired``: (data/unpaired, data/ref_logps_unpaired.parquet), what an unpaired loss trains on."""

    numerics = Numerics.of_policy(params.dtype, params.peft.enabled, params.peft.load_in_4bit)
    acc = make_accelerator(numerics, params.grad_accum)
    seed_everything(params.seed)
    vision = is_vision_model_folder(model_dir)  # dispatched once, on the SFT folder's config
    if vision:
        check_vision_dpo(params, model_dir)
        tokenizer = load_processor(model_dir)  # saved with the model; its tokenizer pads
    else:
        tokenizer = load_tokenizer(model_dir)
        require_chat_template(tokenizer, where=str(model_dir))
    lengths = (params.max_length, params.max_prompt_length)
    if params.unpaired and unpaired is None:
        raise ValueError(f"dpo.loss_type {params.loss_type} trains on unpaired examples: pass --unpaired")
    folder, ref_path = unpaired if params.unpaired and unpaired else (pairs_dir, ref_logps)
    if params.unpaired:  # an unpaired loss (kto) reads data/unpaired
        load = load_vision_unpaired_split if vision else kto.load_unpaired_split
    else:
        load = load_vision_split if vision else load_split
    train_data = load(folder, "train", ref_path, tokenizer, *lengths)
    has_eval = (folder / "eval.parquet").exists()
    eval_data = load(folder, "eval", ref_path, tokenizer, *lengths) if has_eval else None
    if not eval_data and params.early_stopping.metric != "off":
        raise ValueError(f"dpo.early_stopping watches the eval pairs, but {folder} has none")
    if vision:  # as ref_logps loads it; what trains: dpo.vlm_trainable
        model = load_vision_policy(model_dir, numerics, acc.device, params)
    else:
        model = load_model(model_dir, numerics, acc.device)
    if params.gradient_checkpointing:
        enable_activation_checkpointing(model)
    policy = vision_peft(model, params) if vision else apply_peft(model, params.peft)
    scorer_class = VisionCompletionScorer if vision else CompletionScorer
    scorer = scorer_class(policy, head_all_positions=not options.completion_head)
    scorer.train()
    router = router_weight(scorer.causal_lm.config, params.router_aux_loss_coef)
    scorer.route = router > 0
    row_tokens = pack_row_tokens(scorer)
    if params.compile:
        scorer.compile(dynamic=True)
    ref = None
    if params.reference == "live":
        ref = (load_vision_reference if vision else reference_scorer)(model_dir, numerics, acc.device)
    if ref is not None:
        ref.head_all_positions = not options.completion_head
    # compiled graphs would specialise on each batch's segment lengths: keep the plain packed layout
    share = not params.compile and shares_prompt(scorer) and (ref is None or shares_prompt(ref))
    share = share and options.shared_prompt and params.padding_free  # shared prompts live in packed rows
    optimizer = build_optimizer(scorer, params, fused=options.fused_adamw)
    global_size = params.batch_size * params.grad_accum * acc.num_processes
    per_epoch = steps_per_epoch(len(train_data), global_size, params.grad_accum * acc.num_processes)
    total = params.max_steps if params.max_steps > 0 else params.epochs * per_epoch
    if per_epoch == 0:
        rows = f"{folder / 'train.parquet'} examples" if params.unpaired else "train pairs"
        raise ValueError(f"dpo: {len(train_data)} {rows} are too few for one step of {global_size}")
    scheduler = build_scheduler(optimizer, params, total)
    scorer, optimizer = prepare(acc, scorer, optimizer, params)
    pad = (tokenizer.tokenizer if vision else tokenizer).pad_token_id
    run = DpoRun(params, acc, scorer, ref, optimizer, scheduler, train_data, eval_data or None,
                 pad, total, row_tokens, share, options, router, image_token_id(model) if vision else None)  # fmt: skip
    return run, tokenizer


def run_dpo(
    model_dir: Path,
    pairs_dir: Path,
    ref_logps: Path,
    out_dir: Path,
    checkpoints: Path,
    metrics_dir: Path,
    params: DpoParams,
    unpaired: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    """Train, resuming from a matching checkpoint; write ``out_dir`` and ``metrics_dir/metrics.json``.

    ``unpaired``: (data/unpaired, data/ref_logps_unpaired.parquet), read by an unpaired loss (kto)."""
    check_loss(params)
    run, tokenizer = build_run(model_dir, pairs_dir, ref_logps, params, unpaired=unpaired)
    acc = run.accelerator
    inputs = {"model": model_dir, "train pairs": pairs_dir / "train.parquet", "ref_logps": ref_logps}
    if params.unpaired and unpaired is not None:
        inputs = {
            "model": model_dir,
            "train examples": unpaired[0] / "train.parquet",
            "ref_logps": unpaired[1],
        }
    fp = fingerprint(params, inputs, acc.num_processes)
    if acc.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        find_checkpoint(checkpoints, fp, "dpo")  # deletes stale ones
    acc.wait_for_everyone()
    found = find_checkpoint(checkpoints, fp, "dpo")
    start = load_checkpoint(acc, found, run.scheduler, run.ref_scorer) if found else 0
    if found and acc.is_main_process:
        print(f"dpo: resuming from {found} (step {start} of {run.total_steps})", flush=True)
    log = MetricsLog(metrics_dir, acc.is_main_process, checkpoint_history(found) if found else ())
    truncation = count_truncation(run.train.pairs + (run.eval.pairs if run.eval else []))
    if acc.is_main_process:
        truncation.warn("dpo", "examples" if params.unpaired else "pairs", DPO_LENGTH_KEYS)
    summary = train(run, start, log, checkpoints, fp, found)
    summary["diagnostics"] = report(
        summary.pop("tracker"), log.history, params.beta, acc.is_main_process, params.unpaired
    )
    summary["truncation"] = truncation.as_dict()  # pairs cut, by what was cut (prompt, completion, both)
    state = acc.get_state_dict(run.scorer)
    if acc.is_main_process:
        policy = acc.unwrap_model(run.scorer).model
        policy = unquantized_copy(policy, model_dir, params.peft) if params.peft.load_in_4bit else policy
        full = None if params.peft.enabled else {k.removeprefix("model."): v for k, v in state.items()}
        save_model(policy, full, tokenizer, out_dir)
        log.close(summary)
    acc.wait_for_everyone()
    return summary


@dataclass(frozen=True)
class DpoPaths:
    """Where the stage reads and writes (``dvc.yaml`` passes them on the command line)."""

    model: Path
    pairs: Path
    ref_logps: Path
    out: Path
    checkpoints: Path
    metrics_dir: Path
    unpaired: Path | None = None  # data/unpaired: what kto / apo_zero_unpaired train on
    ref_logps_unpaired: Path | None = None  # data/ref_logps_unpaired.parquet


def run(params: DpoParams, paths: DpoPaths) -> dict[str, Any]:
    """The stage: train, resuming from a matching checkpoint; returns the summary."""
    p = paths
    unpaired = (p.unpaired, p.ref_logps_unpaired) if p.unpaired and p.ref_logps_unpaired else None
    return run_dpo(p.model, p.pairs, p.ref_logps, p.out, p.checkpoints, p.metrics_dir, params, unpaired)
