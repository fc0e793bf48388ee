"""The ``dpo`` stage: preference optimisation of ``models/sft`` on the train pairs.

The policy is the only model in memory: reference log-probs come from
``data/ref_logps.parquet`` unless ``dpo.reference: live`` (TR-DPO, Gorbatovski et al. 2024,
syncs that live reference: ``ref <- alpha * policy + (1 - alpha) * ref`` every k steps).
The loop runs on accelerate (``accelerate launch`` with configs/accelerate/*.yaml). The loss of a
step is the mean over the pairs of its global batch: each micro-batch contributes its per-pair
sum divided by the global batch size, so uneven micro-batches weigh each pair the same.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alignpipe.artifacts.pairs import DPO_LENGTH_KEYS, count_truncation
from alignpipe.core import losses
from alignpipe.core.chat import require_chat_template
from alignpipe.core.logprobs import (
    CompletionScorer,
    PairLogps,
    collate_pairs,
    pack_row_tokens,
    pair_logps,
    shares_prompt,
)
from alignpipe.core.models import enable_activation_checkpointing, load_tokenizer, seed_everything
from alignpipe.core.objective import combined_loss, preference_loss
from alignpipe.core.progress import Timer
from alignpipe.core.router import router_weight
from alignpipe.dpo.data import (
    DpoPairs,
    epoch_batches,
    file_batches,
    load_split,
    micro_batches,
    steps_per_epoch,
)
from alignpipe.dpo.diagnostics import PairTracker, pair_margins, report
from alignpipe.dpo.early_stop import EarlyStopper
from alignpipe.dpo.tr_dpo import sync_reference
from alignpipe.params import DpoParams
from alignpipe.training.checkpoints import (
    checkpoint_history,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from alignpipe.training.fingerprint import fingerprint
from alignpipe.training.launch import make_accelerator, prepare
from alignpipe.training.loop import NonFiniteError, Window, build_optimizer, build_scheduler, save_model
from alignpipe.training.metrics import MetricsLog
from alignpipe.training.numerics import Numerics, load_model, reference_scorer
from alignpipe.training.peft import apply_peft, unquantized_copy
from alignpipe.training.timed_save import SaveTimer

# Per-pair quantities summed over a step (then divided by its pairs): the names DVCLive logs.
SUMMED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "logps/rejected")  # fmt: skip


@dataclass(frozen=True)
class LoopOptions:
    """Switches of the loop that are not params: ``bench/dpo_throughput.py`` turns them for its
    parity run (``data_order="file"``: TRL's sequential order) and its ablations."""

    data_order: Literal["length_grouped", "file"] = "length_grouped"
    shared_prompt: bool = True  # pairs run their prompt once where the model allows it
    fused_adamw: bool = True
    completion_head: bool = True  # the LM head only on positions that predict a completion token


@dataclass
class DpoRun:
    """Everything one training run holds."""

    params: DpoParams
    accelerator: Any
    scorer: nn.Module  # the prepared CompletionScorer of the policy
    ref_scorer: CompletionScorer | None  # live reference only
    optimizer: Any
    scheduler: Any
    train: DpoPairs
    eval: DpoPairs | None
    pad_token_id: int
    total_steps: int
    row_tokens: int | None  # padding-free row capacity (logprobs.pack_row_tokens)
    share_prompt: bool = False  # padding-free pairs run their prompt once (alignpipe.core.attention)
    options: LoopOptions = LoopOptions()
    router_coef: float = 0.0  # MoE: weight of the router's load-balancing loss (alignpipe.core.router)

    @property
    def global_size(self) -> int:
        return self.params.batch_size * self.params.grad_accum * self.accelerator.num_processes


def pair_losses(policy: PairLogps, ref_chosen: Tensor, ref_rejected: Tensor, p: DpoParams) -> Tensor:
    """Per-pair loss (B,) of ``dpo.loss_type`` (a list: weighted by ``dpo.loss_weights``)."""
    wpo = None
    if p.wpo:
        assert policy.chosen_aligned_logps is not None and policy.rejected_aligned_logps is not None
        wpo = losses.wpo_weights(
            policy.chosen_aligned_logps / policy.chosen_tokens.clamp(min=1),
            policy.rejected_aligned_logps / policy.rejected_tokens.clamp(min=1),
        )
    common = dict(
        beta=p.beta,
        label_smoothing=p.label_smoothing,
        chosen_lengths=policy.chosen_tokens,
        rejected_lengths=policy.rejected_tokens,
        rpo_alpha=p.rpo_alpha or 0.0,
        wpo_weights=wpo,
        **p.loss_options,
    )
    logps = (policy.chosen_logps, policy.rejected_logps, ref_chosen, ref_rejected)
    if isinstance(p.loss_type, str):
        return preference_loss(p.loss_type, *logps, **common)
    weights = p.loss_weights or [1.0] * len(p.loss_type)
    return combined_loss(p.loss_type, weights, *logps, **common)


def check_loss(p: DpoParams) -> None:
    """Fail before any model loads if the loss settings are invalid (unknown name or option)."""
    one = torch.ones(1)
    dummy = PairLogps(-one, -one, one.long(), one.long(), -one, -one)
    pair_losses(dummy, -one, -one, p)


def metric_sums(policy: PairLogps, ref_c: Tensor, ref_r: Tensor, per_pair: Tensor, beta: float) -> Tensor:
    """Sums over the batch of the :data:`SUMMED` quantities, then pairs and non-finite losses."""
    chosen, rejected = losses.implicit_rewards(policy.chosen_logps, policy.rejected_logps, ref_c, ref_r, beta)
    values = [per_pair.detach(), chosen, rejected, chosen - rejected, (chosen > rejected).float(),
              policy.chosen_logps.detach(), policy.rejected_logps.detach()]  # fmt: skip
    sums = [v.float().sum() for v in values]
    sums += [torch.tensor(float(per_pair.numel())), (~torch.isfinite(per_pair)).sum().float()]
    return torch.stack([s.to(per_pair.device) for s in sums])


def batch_logps(run: DpoRun, data: DpoPairs, index: list[int]) -> tuple[Any, PairLogps, Tensor, Tensor]:
    """Collate ``index``; policy log-probs (with grad when enabled) and reference log-probs."""
    device = run.accelerator.device
    pairs = [data.pairs[i] for i in index]
    batch = collate_pairs(pairs, run.params.padding_free, run.pad_token_id, run.row_tokens, run.share_prompt)
    batch = batch.to(device)
    policy = pair_logps(run.scorer, batch, aligned=run.params.wpo)
    if run.params.reference_free:  # TRL's reference_free: log pi_ref = 0
        ref_c, ref_r = torch.zeros_like(policy.chosen_logps), torch.zeros_like(policy.rejected_logps)
    elif run.ref_scorer is None:
        ref_c, ref_r = (t.to(device) for t in data.ref(index))
    else:
        with torch.no_grad(), run.accelerator.autocast():  # the policy's mixed precision
            live = pair_logps(run.ref_scorer, batch)
        ref_c, ref_r = live.chosen_logps, live.rejected_logps
    return batch, policy, ref_c, ref_r


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, summed over processes: per-pair sums of :data:`SUMMED`, pairs, tokens."""

    sums: dict[str, float]
    pairs: int
    tokens: int
    grad_norm: float
    learning_rate: float
    margins: dict[str, float]  # implicit-reward margin of each pair of this process's micro-batches


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
    norm = acc.clip_grad_norm_(run.scorer.parameters(), p.max_grad_norm)
    grad_norm = float(norm) if norm is not None else 0.0  # None: DeepSpeed before its first step
    n_bad = sums[len(SUMMED) + 1]
    if n_bad > 0 or not math.isfinite(grad_norm):
        run.optimizer.zero_grad()
        what = "loss" if n_bad > 0 else f"gradient (norm {grad_norm})"
        ids = bad or [run.train.pairs[i].pair_id for index in micros for i in index]
        raise NonFiniteError(f"dpo: non-finite {what} at step {step}; batch pairs: {', '.join(ids)}")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()
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


def log_window(log: MetricsLog, step: int, window: Window, last: StepStats) -> None:
    """Means over the window's pairs; grad norm and learning rate of its last step; throughput."""
    n = max(window.pairs, 1)
    metrics = {k: window.sums[k] / n for k in SUMMED}
    metrics.update(
        grad_norm=last.grad_norm,
        learning_rate=last.learning_rate,
        pairs_per_s=window.pairs / max(window.seconds, 1e-9),
        tokens_per_s=window.tokens / max(window.seconds, 1e-9),
    )
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
    for step, micros, n_global in schedule(run, start):
        t0 = time.perf_counter()
        stats = train_step(run, step, micros, n_global)
        window.add(stats.sums, stats.pairs, stats.tokens, time.perf_counter() - t0)
        pairs_seen += stats.pairs
        tracker.see(stats.margins)
        if p.ref_sync_steps and step % p.ref_sync_steps == 0:
            assert run.ref_scorer is not None
            sync_reference(acc.unwrap_model(run.scorer).model, run.ref_scorer.model, p.ref_sync_alpha)
        if step % p.logging_steps == 0 or step == run.total_steps:
            log_window(log, step, window, stats)
            window = Window.empty()
        if run.eval is not None and (step % p.eval_steps == 0 or step == run.total_steps):
            log.log(step, metrics := evaluate(run))
            if stopper.update(step, metrics):
                break  # early stopping: the final model is this step's
        if (step % p.save_steps == 0 or saver.due()) and step < run.total_steps:
            extra = tracker.synced_state()  # the main process saves the pairs every process saw
            save_checkpoint(acc, checkpoints, step, fp, run.scheduler, run.ref_scorer, log.history, extra)
            saver.restart()
        bar.update(1)
    bar.close()
    if stopper.stopped_at is not None and window.pairs:  # the steps since the last log, as at the end
        log_window(log, stopper.stopped_at, window, stats)
    last = stopper.stopped_at or run.total_steps
    if acc.is_main_process:
        timer.summary(pairs_seen, "pairs", steps=last - start)
    rate = pairs_seen / max(timer.seconds, 1e-9)
    return {"steps": last, "resumed_from": start, "train_pairs": len(run.train),
            "train_seconds": round(timer.seconds, 2), "train_pairs_per_s": round(rate, 3),
            "early_stopping": stopper.summary(), "tracker": tracker}  # fmt: skip


def build_run(
    model_dir: Path, pairs_dir: Path, ref_logps: Path, params: DpoParams, options: LoopOptions = LoopOptions()
) -> tuple[DpoRun, Any]:
    """Accelerator, data, policy (LoRA when asked), live reference, optimizer and scheduler."""

    numerics = Numerics.of_policy(params.dtype, params.peft.enabled, params.peft.load_in_4bit)
    acc = make_accelerator(numerics, params.grad_accum)
    seed_everything(params.seed)
    tokenizer = load_tokenizer(model_dir)
    require_chat_template(tokenizer, where=str(model_dir))
    lengths = (params.max_length, params.max_prompt_length)
    train_data = load_split(pairs_dir, "train", ref_logps, tokenizer, *lengths)
    has_eval = (pairs_dir / "eval.parquet").exists()
    eval_data = load_split(pairs_dir, "eval", ref_logps, tokenizer, *lengths) if has_eval else None
    if not eval_data and params.early_stopping.metric != "off":
        raise ValueError(f"dpo.early_stopping watches the eval pairs, but {pairs_dir} has none")
    model = load_model(model_dir, numerics, acc.device)  # the ref_logps stage loads the same way
    if params.gradient_checkpointing:
        enable_activation_checkpointing(model)
    scorer = CompletionScorer(apply_peft(model, params.peft), head_all_positions=not options.completion_head)
    scorer.train()
    router = router_weight(scorer.causal_lm.config, params.router_aux_loss_coef)
    scorer.route = router > 0
    row_tokens = pack_row_tokens(scorer)
    if params.compile:
        scorer.compile(dynamic=True)
    ref = reference_scorer(model_dir, numerics, acc.device) if params.reference == "live" else None
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
        raise ValueError(f"dpo: {len(train_data)} train pairs are too few for one step of {global_size}")
    scheduler = build_scheduler(optimizer, params, total)
    scorer, optimizer = prepare(acc, scorer, optimizer, params)
    run = DpoRun(params, acc, scorer, ref, optimizer, scheduler, train_data, eval_data or None,
                 tokenizer.pad_token_id, total, row_tokens, share, options, router)  # fmt: skip
    return run, tokenizer


def run_dpo(
    model_dir: Path,
    pairs_dir: Path,
    ref_logps: Path,
    out_dir: Path,
    checkpoints: Path,
    metrics_dir: Path,
    params: DpoParams,
) -> dict[str, Any]:
    """Train, resuming from a matching checkpoint; write ``out_dir`` and ``metrics_dir/metrics.json``."""
    check_loss(params)
    run, tokenizer = build_run(model_dir, pairs_dir, ref_logps, params)
    acc = run.accelerator
    inputs = {"model": model_dir, "train pairs": pairs_dir / "train.parquet", "ref_logps": ref_logps}
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
        truncation.warn("dpo", "pairs", DPO_LENGTH_KEYS)
    summary = train(run, start, log, checkpoints, fp, found)
    summary["diagnostics"] = report(summary.pop("tracker"), log.history, params.beta, acc.is_main_process)
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


def run(params: DpoParams, paths: DpoPaths) -> dict[str, Any]:
    """The stage: train, resuming from a matching checkpoint; returns the summary."""
    p = paths
    return run_dpo(p.model, p.pairs, p.ref_logps, p.out, p.checkpoints, p.metrics_dir, params)
