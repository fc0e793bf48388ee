"""The alignpipe pipeline as a Prefect 3 flow: a typed form in the UI, DVC underneath.

The flow is thin: it writes the form's params, asks DVC for the DAG, and runs
each stage as one Prefect task through ``dvc repro --single-item <stage>``, so
DVC alone decides what is stale. Serve it with ``python flows/pipeline.py``.
"""

import argparse
import logging
import os
import shlex
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client

from alignpipe.orchestration.dag import (
    FAILED,
    NOT_RUN,
    RAN,
    dvc_command,
    error_message,
    read_dag,
    stage_command,
    stage_env,
    stage_status,
)
from alignpipe.orchestration.flow_support import (
    Change,
    ProcessResult,
    StageResult,
    current_sections,
    form_baseline,
    run_streaming,
    shard_devices,
    update_params,
)
from alignpipe.orchestration.report import round_rows, run_report
from alignpipe.params import (
    BaseModelParams,
    DataParams,
    DpoParams,
    EvaluateParams,
    GenerateParams,
    PairsParams,
    Params,
    RefLogpsParams,
    RewardModelParams,
    RewardParams,
    RoundsParams,
    SftParams,
)

REPO = Path(__file__).resolve().parents[1]
FLOW_NAME, DEPLOYMENT_NAME = "alignpipe", "pipeline"


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message is the stage's own last ``error:`` line."""


def _log_line(logger: Any, line: str) -> None:
    level = logging.ERROR if line.startswith(("error:", "ERROR:")) else logging.INFO
    logger.log(level, "%s", line)


def _shown(cmd: list[str] | str) -> str:
    if isinstance(cmd, str):
        return cmd
    dvc = dvc_command()
    return shlex.join(["dvc", *cmd[len(dvc) :]] if cmd[: len(dvc)] == dvc else cmd)


def _run(cmd: list[str] | str, workspace: str, what: str, env: dict[str, str] | None = None) -> ProcessResult:
    """Run ``cmd`` (a shell string or argv), streaming its lines into the run logs."""
    logger = get_run_logger()
    logger.info("$ %s", _shown(cmd))
    argv = ["bash", "-c", cmd] if isinstance(cmd, str) else cmd
    result = run_streaming(argv, workspace, stage_env(env), lambda _stream, line: _log_line(logger, line))
    if result.returncode != 0:
        raise StageFailed(f"{what} failed: {error_message(result.stderr_tail, result.returncode)}")
    return result


@task(cache_policy=NO_CACHE, task_run_name="{stage}")
def run_stage(stage: str, workspace: str, force: bool = False) -> StageResult:
    """``dvc repro --single-item <stage>``: DVC runs it only if its deps or params changed."""
    start = time.perf_counter()
    cmd = [*dvc_command(), "repro", "--single-item", stage, *(["--force"] if force else [])]
    status = stage_status(_run(cmd, workspace, f"stage '{stage}'").dvc_lines, stage)
    get_run_logger().info("stage '%s': %s", stage, status)
    return StageResult(stage, status, round(time.perf_counter() - start, 1))


@task(cache_policy=NO_CACHE)
def run_dvc(args: list[str], workspace: str) -> None:
    """Another dvc command (``exp save``, ``push``), logged like a stage."""
    _run([*dvc_command(), *args], workspace, f"dvc {args[0]}")


@task(cache_policy=NO_CACHE, task_run_name="generate-shard-{shard}")
def run_generate_shard(command: str, shard: int, workspace: str) -> int:
    """``<generate cmd> --shard i``: the chunks of one shard, into the stage's persist out."""
    env = shard_devices(shard, os.environ)
    _run(f"{command} --shard {shard}", workspace, f"generate shard {shard}", env)
    return shard


def _generate_shards(workspace: Path, force: bool) -> None:
    """Run generate's shards as parallel tasks before DVC runs (and merges) the stage."""
    num_shards = current_sections(workspace / "params.yaml")["generate"]["num_shards"]
    stale = subprocess.run(
        [*dvc_command(), "status", "--json", "generate"], cwd=workspace, capture_output=True, text=True,
        env=stage_env(),
    ).stdout.strip() not in ("{}", "")  # fmt: skip
    if num_shards <= 1 or not (stale or force):
        return
    command = stage_command(workspace, "generate")
    futures = [run_generate_shard.submit(command, i, str(workspace)) for i in range(num_shards)]
    for future in futures:
        future.result()


def _deployment_parameters() -> dict[str, Any] | None:
    """The deployment's parameters (the form's defaults), or None outside a deployment."""
    if not runtime.deployment.id:
        return None
    with get_client(sync_client=True) as client:
        return client.read_deployment(runtime.deployment.id).parameters


def _publish(workspace: Path, results: list[StageResult], changes: list[Change]) -> None:
    rows = [
        {"stage": r.stage, "status": r.status, "seconds": r.seconds, "message": r.message} for r in results
    ]
    create_table_artifact(
        rows, key="alignpipe-stages", description="Which stages ran and which were up to date"
    )
    rounds = round_rows(workspace)
    if len(rounds) > 2:  # rounds.extra ran: one row per round (0: SFT), as the `rounds` plot draws them
        create_table_artifact(rounds, key="alignpipe-rounds",
                              description="Per round: its policy's pass rate, win rate vs SFT, KL")  # fmt: skip
    create_markdown_artifact(run_report(workspace, results, changes), key="alignpipe-report",
                             description="Params changed, evaluation metrics, rounds, plots")  # fmt: skip


@flow(name=FLOW_NAME)
def pipeline(
    stages: list[str] | None = None,
    force: bool = False,
    base_model: BaseModelParams | None = None,
    data: DataParams | None = None,
    sft: SftParams | None = None,
    generate: GenerateParams | None = None,
    reward: RewardParams | None = None,
    reward_model: RewardModelParams | None = None,
    pairs: PairsParams | None = None,
    ref_logps: RefLogpsParams | None = None,
    dpo: DpoParams | None = None,
    evaluate: EvaluateParams | None = None,
    rounds: RoundsParams | None = None,
    retries: dict[str, int] | None = None,
    save_experiment: str | None = None,
    push: bool = False,
    generate_shards_parallel: bool = False,
    workspace: str | None = None,
) -> list[dict[str, Any]]:
    """Run the alignpipe DVC pipeline, one task per stage in DVC's DAG order.

    Params are applied by writing params.yaml, not by ``dvc exp run -S``: the run
    keeps plain ``dvc repro`` semantics (one task per stage, only stale stages
    run, a failed run resumes where it stopped), and the workspace shows what ran
    (``git diff params.yaml``, ``dvc params diff``). Only keys the user changed are
    written, in place, so params.yaml keeps its comments and layout. To keep the
    run as a named experiment, set ``save_experiment`` (``dvc exp save -n``).

    Each section is optional: None keeps params.yaml as it is. The served deployment
    fills the form with params.yaml's values (not the models' defaults), and a key
    left as the form showed it is never written, so an old form cannot revert a
    key edited in params.yaml since. From the CLI a partial section is enough:
    ``--param dpo='{"beta": 0.2}'`` writes ``dpo.beta`` only (a partial section must
    pass its model's cross-key checks with the defaults for the rest, e.g. give
    ``max_length`` with a larger ``max_prompt_length``). Deployments from prefect.yaml
    leave sections null; a section opened in their form starts from the models'
    defaults, and only keys changed from those are written.

    Args:
        stages: Run only these stages and what they need upstream (empty: all); the name of a round
            stage (dpo_round) means all its rounds (dpo_round@extra0, ...), as for `dvc repro`.
        force: Rerun the selected stages even if DVC finds them up to date.
        base_model: params.yaml section `base_model` (empty: keep params.yaml).
        data: params.yaml section `data` (empty: keep params.yaml).
        sft: params.yaml section `sft` (empty: keep params.yaml).
        generate: params.yaml section `generate` (empty: keep params.yaml).
        reward: params.yaml section `reward` (empty: keep params.yaml).
        reward_model: params.yaml section `reward_model` (empty: keep params.yaml).
        pairs: params.yaml section `pairs` (empty: keep params.yaml).
        ref_logps: params.yaml section `ref_logps` (empty: keep params.yaml).
        dpo: params.yaml section `dpo` (empty: keep params.yaml).
        evaluate: params.yaml section `evaluate` (empty: keep params.yaml).
        rounds: params.yaml section `rounds` (empty: keep params.yaml).
        retries: Retries per stage, e.g. {"generate": 2} ({"generate_round": 2}: every round's);
            stages not named get none.
        save_experiment: After a successful run, save the workspace as this DVC experiment.
        push: After a successful run, `dvc push` the outputs to the DVC remote (pods, CI).
        generate_shards_parallel: When generate is stale, run its
            `generate.num_shards` shards as parallel tasks (`<generate cmd> --shard i`, one GPU
            of CUDA_VISIBLE_DEVICES each) before DVC runs the stage, which then only merges.
        workspace: The DVC repository to run in (empty: the checkout holding this flow).
    """
    logger = get_run_logger()
    root = Path(workspace or REPO).resolve()
    sections = dict(zip(Params.model_fields, (base_model, data, sft, generate, reward, reward_model, pairs,
                                                ref_logps, dpo, evaluate, rounds), strict=True))  # fmt: skip
    changes = update_params(root / "params.yaml", sections, form_baseline(_deployment_parameters(), sections))
    for change in changes:
        logger.info("params.yaml: %s: %r -> %r", change.key, change.old, change.new)
    graph = read_dag(root)
    plan = graph.plan(stages)
    per_stage = {m: n for name, n in (retries or {}).items() for m in graph.members(name)}
    logger.info("plan (DVC order): %s", " -> ".join(plan))
    results: list[StageResult] = []
    try:
        for stage in plan:
            if stage == "generate" and generate_shards_parallel:
                _generate_shards(root, force)
            task_ = run_stage.with_options(name=f"stage-{stage}", retries=per_stage.get(stage, 0))
            results.append(task_(stage, str(root), force))
    except BaseException as exc:
        failed = plan[len(results)]
        results.append(StageResult(failed, FAILED, message=str(exc)))
        results += [StageResult(s, NOT_RUN) for s in plan[len(results) :]]
        raise
    finally:
        _publish(root, results, changes)
    if save_experiment:
        run_dvc.with_options(name="dvc-exp-save")(
            ["exp", "save", "--force", "--name", save_experiment], str(root)
        )
    if push:
        run_dvc.with_options(name="dvc-push")(["push"], str(root))
    logger.info("ran: %s", ", ".join(r.stage for r in results if r.status == RAN) or "nothing (up to date)")
    return [asdict(r) for r in results]


def deployment_parameters(workspace: Path, explicit_workspace: bool) -> dict[str, Any]:
    """The form's defaults: every params.yaml section as the stages will read it."""
    params: dict[str, Any] = current_sections(workspace / "params.yaml")
    if explicit_workspace:
        params["workspace"] = str(workspace)
    return params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=f"Serve the deployment '{FLOW_NAME}/{DEPLOYMENT_NAME}'.")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name")
    parser.add_argument("--workspace", default=None, help="DVC repository to run in (default: this checkout)")
    args = parser.parse_args(argv)
    workspace = Path(args.workspace or REPO).resolve()
    pipeline.serve(
        name=args.name,
        parameters=deployment_parameters(workspace, args.workspace is not None),
        limit=1,  # one run at a time: two runs would clobber one workspace (and DVC's lock)
        global_limit=1,  # also across several `serve` processes of this deployment
        description=(pipeline.__doc__ or "").split("\n\n")[0],
        tags=["alignpipe"],
    )


if __name__ == "__main__":
    main()
