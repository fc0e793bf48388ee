"""The ``evaluate`` stage: the DPO model against the SFT model (and the base) on held-out data.

On the eval prompts (``data/prepared/eval_prompts.parquet``) each model samples ``evaluate.n``
answers with the same backend, settings and per-prompt seeds (:func:`alignpipe.generation.sample`
keyed by prompt id), and every answer is scored with the ``reward`` section's reward, so:

- per model: mean reward, mean answer length in tokens (length exploitation shows here) and,
  with the built-in reward, the pass rate (verifier score == 1) overall and per primary family
  (``spec.constraints[0].family``);
- win rate of DPO over SFT, answer against answer for the same prompt and sample index, ties 1/2;
- KL(dpo || sft) (:mod:`alignpipe.evaluate.logps`, one path for text and VLM), Monte-Carlo: the mean
  over DPO's own answers y of ``log p_dpo(y|x) - log p_sft(y|x)``, both through
  :mod:`alignpipe.core.logprobs` (the path of ``ref_logps`` and ``dpo``), with its standard error over
  prompts. The answers are drawn from
  the sampler (temperature, top-k/p), so this is exactly KL(dpo || sft) only at temperature 1
  without truncation; otherwise it is that expectation under the sampler.

On the eval pairs (``data/pairs/eval.parquet``): the DPO implicit-reward accuracy, the fraction of
pairs with ``beta [(log p_dpo(c) - ref(c)) - (log p_dpo(r) - ref(r))] > 0``, and the mean of that
margin, against the cached reference log-probs (``data/ref_logps.parquet``).

Intervals, length control and the overfitting signals: :mod:`alignpipe.evaluate.stats`,
:mod:`alignpipe.evaluate.signals` (NLL of SFT demonstrations, ``data/prepared/sft.parquet``); the
thresholds that fail the stage after its reports are written: :mod:`alignpipe.evaluate.gate`.

:mod:`alignpipe.evaluate.report` writes ``eval.json``, ``eval.md`` and the plots.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import ArtifactError, read_parquet
from alignpipe.artifacts.pairs import DPO_LENGTH_KEYS
from alignpipe.core.chat import Truncation
from alignpipe.core.progress import Timer
from alignpipe.data import builtin as task
from alignpipe.evaluate.compare import win_rate
from alignpipe.evaluate.logps import answers_kl, policy_logps
from alignpipe.evaluate.preferences import preference_split
from alignpipe.evaluate.results import MODELS, Answer, EvalPrompt, EvalResult
from alignpipe.evaluate.rounds import earlier_rounds, is_round, with_rounds
from alignpipe.evaluate.signals import forgetting
from alignpipe.params import DpoParams, EvaluateParams, RewardParams, RoundsParams
from alignpipe.vision.models import is_vision_model_folder


def load_eval_prompts(path: str | os.PathLike, max_prompts: int | None) -> list[EvalPrompt]:
    rows = read_parquet(path, schema.PROMPTS)[:max_prompts]
    if not rows:
        raise ArtifactError(f"{path}: no eval prompts")
    ids = [r["prompt_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ArtifactError(f"{path}: prompt_id {next(i for i in ids if ids.count(i) > 1)!r} appears twice")
    return [EvalPrompt(r["prompt_id"], r["prompt"], r["meta"], task.primary_family(r["meta"])) for r in rows]


def generate_answers(
    model_dir: str | os.PathLike, prompts: Sequence[EvalPrompt], params: EvaluateParams, label: str
) -> list[Answer]:
    """``params.n`` answers per prompt; seeds are keyed by prompt id, so every model draws the same numbers."""
    from tqdm.auto import tqdm

    from alignpipe.generation.load import sample

    timer = Timer(f"evaluate: generate {label}")
    with tqdm(total=len(prompts), unit="prompt", desc=f"generate {label}") as bar:
        texts, keys = [p.prompt for p in prompts], [p.prompt_id for p in prompts]
        samples = sample(model_dir, texts, params, params.n, keys=keys, progress=bar.update)
    answers = [
        Answer(prompts[s.prompt_index].prompt_id, s.sample_idx, s.completion, s.n_tokens, s.finish_reason)
        for s in samples
    ]
    timer.summary(sum(a.n_tokens for a in answers), "tokens", samples=len(answers))
    return answers


def judge(reward_params: RewardParams, prompts: Sequence[EvalPrompt]) -> RewardParams:
    """The reward the answers are judged by: the ``reward`` section's, except that ``reward.kind:
    trained`` on built-in prompts is judged by the verifier it learned (pass rates stay comparable
    with a verifier-scored run; the trained model only picked the best-of-N pairs)."""
    if reward_params.kind == "trained" and prompts and all(p.meta for p in prompts):
        return RewardParams(kind="builtin")
    return reward_params


def score_answers(
    reward_params: RewardParams,
    prompts: Sequence[EvalPrompt],
    answers: dict[str, list[Answer]],
    reward_model: Path | None = None,
    images: Mapping[str, list[Any]] | None = None,
) -> tuple[dict[str, list[Answer]], str]:
    """Every model's answers with their reward, scored in one pass of the ``reward`` section's reward;
    ``images`` (VLM prompts): prompt_id -> its opened images, passed to the reward as score does (every
    kind but ``builtin``: the verifier reads text)."""
    from dataclasses import replace

    from alignpipe.rewards.base import reward_truncation, score_completions
    from alignpipe.rewards.load import get_reward

    if reward_params.kind == "builtin":
        images = None
    by_id = {p.prompt_id: p for p in prompts}
    flat = [(model, a) for model, rows in answers.items() for a in rows]
    timer = Timer("evaluate: reward")
    reward = get_reward(reward_params, reward_model)
    try:
        results = score_completions(
            reward,
            [by_id[a.prompt_id].prompt for _, a in flat],
            [a.completion for _, a in flat],
            [by_id[a.prompt_id].meta for _, a in flat],
            labels=[f"({m}, prompt_id={a.prompt_id}, sample_idx={a.sample_idx})" for m, a in flat],
            images=None if images is None else [images[a.prompt_id] for _, a in flat],
        )
    finally:
        reward.close()
    reward_truncation(results).warn("evaluate", "answers scored by the reward model", "reward.max_length")
    builtin = reward_params.kind == "builtin"
    scored: dict[str, list[Answer]] = {m: [] for m in answers}
    for (model, a), res in zip(flat, results, strict=True):
        scored[model].append(replace(a, reward=res.reward, passed=(res.reward == 1.0) if builtin else None))
    timer.summary(len(flat), "answers")
    return scored, reward.name


def run_evaluate(
    models: Mapping[str, str | os.PathLike],
    prompts_path: str | os.PathLike,
    pairs_path: str | os.PathLike,
    ref_logps_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    params: EvaluateParams,
    reward_params: RewardParams,
    dpo: DpoParams,
    curves: Mapping[str, str | os.PathLike] | None = None,
    reward_model: Path | None = None,
    sft_data: str | os.PathLike | None = None,
    preferences: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the stage; ``models`` maps "sft", "dpo" (and "base", used when ``include_base``) to folders,
    and with rounds "dpo_round_1", ... to the earlier rounds' policies ("dpo": the last round's).

    ``sft_data``: the prepared SFT demonstrations, for the forgetting signal (None: not measured).
    ``preferences``: ``data/pairs/test.parquet`` (``evaluate.preferences``); with rows, eval.json gets
    ``preferences`` (:mod:`alignpipe.evaluate.preferences`).
    Raises :class:`~alignpipe.evaluate.gate.GateFailed` after writing every report when a gate check fails.

    Writes ``out_dir/eval.json``, ``out_dir/eval.md`` and ``out_dir/eval/`` (plot data and PNGs);
    ``curves`` maps "sft"/"dpo" to the training stages' DVCLive plot folders. Returns eval.json.
    """
    from alignpipe.evaluate.gate import enforce
    from alignpipe.evaluate.report import eval_metrics, write_reports

    total = Timer("evaluate")
    prompts = load_eval_prompts(prompts_path, params.max_prompts)
    ops: Any = TextEvaluation()
    if is_vision_model_folder(models["sft"]):  # dispatched once, on the SFT folder's config
        from alignpipe.evaluate.vision import VisionEvaluation

        ops = VisionEvaluation(prompts_path)
    labels = with_rounds([m for m in MODELS if m != "base" or params.include_base], models)
    answers = {m: ops.generate_answers(models[m], prompts, params, m) for m in labels}
    reward_params = judge(reward_params, prompts)
    answers, reward_name = score_answers(reward_params, prompts, answers, reward_model, ops.images)
    truncation: dict[str, Truncation] = {}
    kl, pairs = ops.policy_logps(models["dpo"], models["sft"], prompts, answers["dpo"], pairs_path,
                                 ref_logps_path, params, dpo, truncation)  # fmt: skip
    for what, counts in truncation.items():
        counts.warn("evaluate", f"eval {what}", DPO_LENGTH_KEYS)
    round_kl = {m: ops.answers_kl(models[m], models["sft"], prompts, answers[m], params, dpo)
                for m in labels if is_round(m)}  # fmt: skip
    demo_nll = ops.forgetting({m: models[m] for m in labels}, sft_data, params, dpo)
    result = EvalResult(
        params=params,
        reward_name=reward_name,
        builtin=reward_params.kind == "builtin",
        family_order=task.FAMILIES,
        backend=ops.backend(params.backend),
        prompts=prompts,
        answers=answers,
        win=win_rate(answers["dpo"], answers["sft"]),
        kl=kl,
        pairs=pairs,
        beta=dpo.beta,
        seconds={"total": round(total.seconds, 1)},
        truncation={what: counts.as_dict() for what, counts in truncation.items()},
        demo_nll=demo_nll,
        round_kl=round_kl,
    )
    metrics = eval_metrics(result)
    split = (
        ops.preference_split(models["dpo"], preferences, ref_logps_path, params, dpo) if preferences else None
    )
    if split is not None:
        metrics["preferences"] = split
    write_reports(result, metrics, Path(out_dir), curves or {})
    total.summary(
        sum(len(a) for a in answers.values()), "answers", win_rate=metrics["win_rate"], kl=metrics["kl"]
    )
    enforce(metrics)
    return metrics


class TextEvaluation:
    """The model-facing steps of :func:`run_evaluate` on a text model (a VLM's, the same methods with
    pixel inputs: :class:`alignpipe.evaluate.vision.VisionEvaluation`)."""

    images = None  # no prompt images for the reward
    generate_answers = staticmethod(generate_answers)
    policy_logps = staticmethod(policy_logps)
    answers_kl = staticmethod(answers_kl)
    forgetting = staticmethod(forgetting)
    preference_split = staticmethod(preference_split)

    @staticmethod
    def backend(name: str) -> str:
        from alignpipe.generation.base import resolve_backend

        return resolve_backend(name)


@dataclass(frozen=True)
class EvaluatePaths:
    """Where the stage reads and writes (``dvc.yaml`` passes them on the command line)."""

    sft: Path
    dpo: Path
    base: Path
    prompts: Path
    pairs: Path
    ref_logps: Path
    out_dir: Path
    sft_curves: Path | None = None
    dpo_curves: Path | None = None
    reward_model: Path | None = None  # models/reward (reward.kind: trained on prompts of your own)
    sft_data: Path | None = None  # data/prepared/sft.parquet: demonstrations for the forgetting signal
    preferences: Path | None = None  # data/pairs/test.parquet (evaluate.preferences; no rows: none)


@dataclass(frozen=True)
class EvaluateSettings:
    """The sections the stage reads: its own, the reward, and ``dpo``'s beta and tokenization lengths."""

    evaluate: EvaluateParams
    reward: RewardParams
    dpo: DpoParams
    rounds: RoundsParams = RoundsParams()  # with rounds after the first: their policies are evaluated too


def run(params: EvaluateSettings, paths: EvaluatePaths) -> dict[str, Any]:
    """The stage; returns eval.json. ``paths.dpo`` is the last round's policy (``rounds.final``); the
    earlier rounds' are the folders ``rounds`` names (models/dpo, models/round-k/dpo)."""
    curves = {k: v for k, v in (("sft", paths.sft_curves), ("dpo", paths.dpo_curves)) if v is not None}
    models = {"sft": paths.sft, "dpo": paths.dpo, "base": paths.base, **earlier_rounds(params.rounds)}
    return run_evaluate(models, paths.prompts, paths.pairs, paths.ref_logps, paths.out_dir,
                        params.evaluate, params.reward, params.dpo, curves=curves,
                        reward_model=paths.reward_model, sft_data=paths.sft_data,
                        preferences=paths.preferences)  # fmt: skip
