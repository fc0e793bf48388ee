"""The Prefect flow (flows/pipeline.py) and its helpers, on a tiny DVC pipeline of our own.

The tiny pipeline has three stages that read real alignpipe params keys,
declared in dvc.yaml in reverse order so that only DVC's DAG gives the right one:

    prepare (data.seed) -> pairs (pairs.seed) -> dpo (dpo.beta; fails if beta > 1)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignpipe.orchestration.dag import (
    RAN,
    RESTORED,
    UNKNOWN,
    UP_TO_DATE,
    Dag,
    DagError,
    error_message,
    parse_dot,
    stage_status,
)
from alignpipe.orchestration.flow_support import (
    Change,
    StageResult,
    form_baseline,
    plan_changes,
    render_params,
    run_streaming,
    shard_devices,
    update_params,
)
from alignpipe.orchestration.report import metrics_table, run_report
from alignpipe.params import DpoParams, Params, ParamsError, PeftParams

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

STEP = """\
import json, sys, yaml
name, src, out, key = sys.argv[1:5]
section, leaf = key.split(".")
value = yaml.safe_load(open("params.yaml"))[section][leaf]
print(f"{name}: start", flush=True)
print(f"{name}: a warning on stderr", file=sys.stderr, flush=True)
if name == "dpo" and value > 1:
    print(f"error: tiny dpo: beta {value} is too large", file=sys.stderr)
    sys.exit(1)
text = (open(src).read() if src != "-" else "") + f"{name} {key}={value}\\n"
open(out, "w").write(text)
if name == "dpo":
    import os
    os.makedirs("reports", exist_ok=True)
    json.dump({"sft": {"score": 0.5}, "dpo": {"score": 0.75}, "pairs": 3}, open("reports/eval.json", "w"))
    open("reports/margins.csv", "w").write("step,margin\\n0,1.0\\n")
"""

DVC_YAML = """\
stages:
  dpo:
    cmd: python step.py dpo pairs.txt dpo.txt dpo.beta
    deps: [step.py, pairs.txt]
    params: [dpo.beta]
    outs: [dpo.txt]
    metrics: [{reports/eval.json: {cache: false}}]
    plots: [{reports/margins.csv: {cache: false}}]
  pairs:
    cmd: python step.py pairs prepared.txt pairs.txt pairs.seed
    deps: [step.py, prepared.txt]
    params: [pairs.seed]
    outs: [pairs.txt]
  prepare:
    cmd: python step.py prepare - prepared.txt data.seed
    deps: [step.py]
    params: [data.seed]
    outs: [prepared.txt]
"""

PARAMS_YAML = """\
# tiny params
data:
  seed: 0          # data seed
pairs:
  seed: 0          # pairs seed
dpo:
  beta: 0.1        # KL strength
  learning_rate: 5.0e-6  # not the model's default (1e-4)
"""


def _load_flow_module():
    spec = importlib.util.spec_from_file_location("alignpipe_flow", ROOT / "flows" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [PY, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def tiny_template(tmp_path_factory) -> Path:
    """A git + dvc repo holding the tiny pipeline, committed, nothing run yet."""
    repo = tmp_path_factory.mktemp("tiny") / "repo"
    repo.mkdir()
    (repo / "step.py").write_text(STEP)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text(PARAMS_YAML)
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    _dvc(repo, "config", "core.analytics", "false")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "tiny")
    return repo


@pytest.fixture()
def tiny_repo(tiny_template, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_template, tmp_path / "repo", symlinks=True))


def _outputs(repo: Path) -> dict[str, float]:
    return {name: (repo / name).stat().st_mtime_ns for name in ("prepared.txt", "pairs.txt", "dpo.txt")}


# ------------------------------------------------------------------ DAG and dvc output


def test_parse_dot_orders_stages_upstream_first_keeping_file_order_for_ties():
    dot = 'strict digraph {\n"dpo";\n"lint";\n"prep";\n"pairs";\n"prep" -> "pairs";\n"pairs" -> "dpo";\n}\n'
    dag = parse_dot(dot)
    assert dag.nodes == ("dpo", "lint", "prep", "pairs")
    assert dag.order() == ["lint", "prep", "pairs", "dpo"]
    assert dag.plan(["pairs"]) == ["prep", "pairs"]
    assert dag.plan(["dpo", "lint"]) == ["lint", "prep", "pairs", "dpo"]


def test_dag_names_unknown_stage_and_cycles():
    dag = Dag(("sft", "dpo"), (("sft", "dpo"),))
    with pytest.raises(DagError, match="unknown stage 'dop' \\(did you mean 'dpo'\\?\\)"):
        dag.plan(["dop"])
    with pytest.raises(DagError, match="cycle"):
        Dag(("a", "b"), (("a", "b"), ("b", "a"))).order()


def test_a_matrix_stages_name_means_all_its_rounds_in_dag_order():
    """``dvc dag --dot`` names the rounds' stages ``<name>@extra<i>``; the flow reads ``dpo_round`` (in
    ``stages`` and ``retries``) as ``dvc repro`` does: every member, each after what it needs."""
    dot = (
        'strict digraph {\n"evaluate";\n"dpo_round@extra1";\n"dpo_round@extra0";\n"dpo";\n"sft";\n'
        '"sft" -> "dpo";\n"dpo" -> "dpo_round@extra0";\n"dpo_round@extra0" -> "dpo_round@extra1";\n'
        '"dpo_round@extra1" -> "evaluate";\n"dpo" -> "evaluate";\n}\n'
    )
    dag = parse_dot(dot)
    assert dag.order() == ["sft", "dpo", "dpo_round@extra0", "dpo_round@extra1", "evaluate"]
    assert dag.members("dpo_round") == ["dpo_round@extra0", "dpo_round@extra1"]
    assert dag.members("dpo_round@extra1") == ["dpo_round@extra1"]
    assert dag.plan(["dpo_round"]) == ["sft", "dpo", "dpo_round@extra0", "dpo_round@extra1"]
    assert dag.plan(["dpo_round@extra0"]) == ["sft", "dpo", "dpo_round@extra0"]
    with pytest.raises(DagError, match="unknown stage 'dpo_rond' \\(did you mean 'dpo_round'\\?\\)"):
        dag.plan(["dpo_rond"])


def test_stage_status_reads_dvc_repro_lines():
    assert stage_status(["Running stage 'dpo':", "> python x"], "dpo") == RAN
    assert stage_status(
        ["Stage 'dpo' didn't change, skipping", "Data and pipelines are up to date."], "dpo"
    ) == (UP_TO_DATE)
    assert stage_status(["Stage 'dpo' is cached - skipping run, checking out outputs"], "dpo") == RESTORED
    assert stage_status(["Running stage 'dpo_eval':"], "dpo") == UNKNOWN  # another stage's line


def test_error_message_prefers_the_stages_own_error_line():
    stderr = [
        "warning: x",
        "error: data/pairs: missing column 'chosen'",
        "ERROR: failed to reproduce 'pairs'",
    ]
    assert error_message(stderr, 255) == "error: data/pairs: missing column 'chosen'"
    assert error_message(["ERROR: failed to reproduce 'pairs': exited with 1"], 255).startswith(
        "ERROR: failed"
    )
    assert error_message([], 3) == "exited with 3"


def test_run_streaming_hands_lines_over_while_the_process_runs(tmp_path):
    """The child waits for a file that only the first line's callback creates."""
    flag = tmp_path / "seen"
    code = (
        "import os, sys, time\nprint('first', flush=True)\nprint('err', file=sys.stderr, flush=True)\n"
        f"t = time.time()\nwhile not os.path.exists({str(flag)!r}) and time.time() - t < 10: time.sleep(0.01)\n"
        f"print('second' if os.path.exists({str(flag)!r}) else 'buffered')\n"
    )
    seen = []

    def on_line(stream, line):
        seen.append((stream, line))
        if line == "first":
            flag.touch()

    result = run_streaming([PY, "-c", code], tmp_path, os.environ, on_line)
    assert result.returncode == 0
    assert sorted(seen) == [("stderr", "err"), ("stdout", "first"), ("stdout", "second")]
    assert list(result.stderr_tail) == ["err"]


def test_shard_devices_spread_round_robin_over_visible_gpus():
    assert shard_devices(5, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert shard_devices(2, {"CUDA_VISIBLE_DEVICES": "4, 6"}) == {"CUDA_VISIBLE_DEVICES": "4"}
    assert shard_devices(1, {}) == {}


# ------------------------------------------------------------------ params.yaml


def test_plan_changes_writes_only_keys_the_user_changed():
    current = Params().model_dump(mode="json")
    current["dpo"]["learning_rate"] = 5e-6  # params.yaml differs from the model default
    # a full form built from params.yaml with one key edited
    form = DpoParams.model_validate({**current["dpo"], "beta": 0.2})
    assert plan_changes({"dpo": form, "sft": None}, current) == [Change("dpo.beta", 0.1, 0.2)]
    # a partial section from the CLI: the unspecified learning_rate is not reset to 1e-4
    partial = DpoParams(beta=0.3, peft=PeftParams(r=8))
    assert plan_changes({"dpo": partial}, current) == [
        Change("dpo.beta", 0.1, 0.3),
        Change("dpo.peft.r", 16, 8),
    ]


def test_plan_changes_keeps_keys_left_as_the_form_showed_them():
    """params.yaml moved on (beta 0.1 -> 0.5) after the form was rendered: only the edit is written."""
    baseline = Params().model_dump(mode="json")
    current = Params(dpo=DpoParams(beta=0.5)).model_dump(mode="json")
    form = DpoParams.model_validate({**baseline["dpo"], "epochs": 2})
    assert plan_changes({"dpo": form}, current, baseline) == [Change("dpo.epochs", 3, 2)]


def test_form_baseline_for_null_sections_is_the_models_defaults_only_for_a_full_form():
    """prefect.yaml deployments leave sections null: the UI form then starts from the models' defaults."""
    current = Params(dpo=DpoParams(learning_rate=5e-6)).model_dump(mode="json")
    full = DpoParams.model_validate(
        {**DpoParams().model_dump(mode="json"), "beta": 0.2}
    )  # defaults + one edit
    partial = DpoParams(learning_rate=3e-5)  # the CLI asking for the default value explicitly
    assert form_baseline(None, {"dpo": full}) is None
    assert form_baseline({"dpo": current["dpo"]}, {"dpo": partial}) == {"dpo": current["dpo"]}
    baseline = form_baseline({"dpo": None}, {"dpo": full, "sft": None})
    assert plan_changes({"dpo": full}, current, baseline) == [Change("dpo.beta", 0.1, 0.2)]  # lr 5e-6 kept
    baseline = form_baseline({"dpo": None}, {"dpo": partial})
    assert plan_changes({"dpo": partial}, current, baseline) == [Change("dpo.learning_rate", 5e-6, 3e-5)]


def test_render_params_keeps_every_other_byte_of_the_real_params_yaml():
    text = (ROOT / "params.yaml").read_text()
    assert render_params(text, []) == text
    changes = [Change("dpo.beta", 0.1, 0.25), Change("dpo.learning_rate", 3e-5, 1e-5),
               Change("dpo.loss_type", ["sigmoid", "sft"], "sigmoid"), Change("dpo.rpo_alpha", None, 1.0)]  # fmt: skip
    new = render_params(text, changes)
    diff = [(a, b) for a, b in zip(text.splitlines(), new.splitlines(), strict=True) if a != b]
    note = (
        "# a loss name, or a list for a weighted mix (MPO); default: DPO + NLL of chosen (README: the tuning)"
    )
    assert diff == [
        (f"  loss_type: [sigmoid, sft] {note}", f"  loss_type: sigmoid        {note}"),
        ("  beta: 0.1                 # KL strength", "  beta: 0.25                # KL strength"),
        ("  rpo_alpha: null           # weight of an NLL term on chosen (RPO; null = off)",
         "  rpo_alpha: 1.0            # weight of an NLL term on chosen (RPO; null = off)"),
        ("  learning_rate: 3.0e-5     # peak learning rate", "  learning_rate: 1.0e-05    # peak learning rate"),
    ]  # fmt: skip
    assert yaml.safe_load(new)["dpo"]["learning_rate"] == 1e-5  # a float for PyYAML too, not "1e-05"


def test_update_params_adds_missing_keys_and_refuses_an_invalid_mix(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_YAML)
    changes = update_params(path, {"dpo": DpoParams(beta=0.3, max_length=512), "pairs": None})
    assert [c.key for c in changes] == ["dpo.beta", "dpo.max_length"]
    assert "  beta: 0.3        # KL strength\n" in path.read_text()
    assert yaml.safe_load(path.read_text())["dpo"]["max_length"] == 512
    update_params(path, {"dpo": DpoParams(max_length=512, max_prompt_length=300)})
    before = path.read_text()
    with pytest.raises(ParamsError, match="max_prompt_length must be smaller"):
        update_params(path, {"dpo": DpoParams(max_length=256)})  # alone valid (128 < 256), merged 300 >= 256
    assert path.read_text() == before


# ------------------------------------------------------------------ reports and config


def test_metrics_table_puts_models_in_columns():
    table = metrics_table({"sft": {"score": 0.5, "family": {"a": 1}}, "dpo": {"score": 0.75}, "pairs": 3})
    assert table.splitlines() == [
        "| metric | sft | dpo |", "|---|---|---|", "| score | 0.5 | 0.75 |", "| family.a | 1 |  |",
        "", "| metric | value |", "|---|---|", "| pairs | 3 |",
    ]  # fmt: skip


def test_run_report_names_changes_metrics_and_plots(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "eval.json").write_text(json.dumps({"dpo": {"score": 0.75}}))
    (tmp_path / "reports" / "margins.csv").write_text("x\n")
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    report = run_report(tmp_path, [StageResult("dpo", RAN)], [Change("dpo.beta", 0.1, 0.2)])
    assert "Stages run: dpo." in report
    assert "| dpo.beta | 0.1 | 0.2 |" in report
    assert "| score | 0.75 |" in report
    assert "- `reports/margins.csv`" in report


ROUNDS_DVC_YAML = """\
stages:
  evaluate:
    cmd: python r.py evaluate ${rounds.final}
    deps:
      - r.py
      - ${rounds.final}
    metrics: [{reports/eval.json: {cache: false}}]
    plots: [{reports/eval/rounds.csv: {cache: false, x: round, y: win_rate}}]
  dpo_round:
    matrix:
      extra: ${rounds.extra}
    cmd: python r.py ${item.extra.name} ${item.extra.previous}
    deps:
      - r.py
      - ${item.extra.previous}
    outs:
      - models/${item.extra.name}/dpo
    plots:
      - reports/${item.extra.name}/dpo/curve.csv:
          cache: false
  dpo:
    cmd: python r.py dpo -
    deps: [r.py]
    outs: [models/dpo]
    plots: [{reports/dpo/curve.csv: {cache: false}}]
plots:
  - rounds:
      x: round
      y:
        reports/eval/rounds.csv: [win_rate, kl]
"""

ROUNDS_PARAMS_YAML = """\
rounds:
  final: models/round-3/dpo
  extra:
    - {name: round-2, previous: models/dpo}
    - {name: round-3, previous: models/round-2/dpo}
"""

# A round's policy is the text "<previous> + <round>"; evaluate writes one row per round (0: SFT)
# with win rates 0.5, 0.6, 0.7, 0.8 and KL 0, 1, 2, 3, and each policy's "score" in eval.json.
ROUNDS_STEP = """\
import json, pathlib, sys
name, previous = sys.argv[1:3]
def write(path, text):
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(text)
if name == "evaluate":
    rows = ["round,model,win_rate,kl"] + [f"{k},{m},{0.5 + k / 10},{float(k)}" for k, m in
                                          enumerate(["sft", "dpo_round_1", "dpo_round_2", "dpo"])]
    write("reports/eval/rounds.csv", "\\n".join(rows) + "\\n")
    scores = {"dpo": {"score": 0.8}, "dpo_round_2": {"score": 0.7}, "sft": {"score": 0.5},
              "dpo_round_1": {"score": 0.6}, "prompts": 4}
    write("reports/eval.json", json.dumps(scores))
else:
    before = "" if previous == "-" else pathlib.Path(previous).read_text()
    write(f"models/{name}/dpo" if name != "dpo" else "models/dpo", before + name + "\\n")
    write(f"reports/{name}/dpo/curve.csv" if name != "dpo" else "reports/dpo/curve.csv", "step,loss\\n0,1\\n")
"""


def _rounds_repo(repo: Path) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "r.py").write_text(ROUNDS_STEP)
    (repo / "dvc.yaml").write_text(ROUNDS_DVC_YAML)
    (repo / "params.yaml").write_text(ROUNDS_PARAMS_YAML)
    return repo


def test_run_report_lists_every_rounds_metrics_and_plots(tmp_path):
    """With rounds.extra, the report has eval.json's earlier rounds as columns in round order, the
    rounds table of reports/eval/rounds.csv, the rounds' stage plots (DVC's matrix resolved) and the
    top-level plot ``rounds``; a plot whose files do not exist is not listed."""
    repo = _rounds_repo(tmp_path / "repo")
    subprocess.run([PY, "r.py", "dpo", "-"], cwd=repo, check=True)
    subprocess.run([PY, "r.py", "round-2", "models/dpo"], cwd=repo, check=True)
    subprocess.run([PY, "r.py", "evaluate", "models/round-3/dpo"], cwd=repo, check=True)
    report = run_report(repo, [StageResult("dpo_round@extra0", RAN)])
    assert "Stages run: dpo_round@extra0." in report
    assert "| metric | sft | dpo_round_1 | dpo_round_2 | dpo |" in report
    assert "| score | 0.5 | 0.6 | 0.7 | 0.8 |" in report and "| prompts | 4 |" in report
    lines = report.splitlines()
    rounds = lines[lines.index("## Rounds") + 4 : lines.index("## Rounds") + 10]
    assert rounds == [
        "| round | model | win_rate | kl |", "|---|---|---|---|", "| 0 | sft | 0.5 | 0 |",
        "| 1 | dpo_round_1 | 0.6 | 1 |", "| 2 | dpo_round_2 | 0.7 | 2 |", "| 3 | dpo | 0.8 | 3 |",
    ]  # fmt: skip
    plots = lines[lines.index("## Plots") + 2 : lines.index("## Plots") + 6]
    assert plots == [
        "- `reports/eval/rounds.csv`", "- `reports/round-2/dpo/curve.csv`", "- `reports/dpo/curve.csv`",
        "- `rounds` (top-level plot: `reports/eval/rounds.csv`)",
    ]  # fmt: skip
    assert "round-3/dpo/curve.csv" not in report  # round 3 has not run


def test_run_report_has_no_rounds_section_with_one_round(tmp_path):
    (tmp_path / "reports" / "eval").mkdir(parents=True)
    (tmp_path / "reports" / "eval" / "rounds.csv").write_text("round,model,win_rate\n0,sft,0.5\n1,dpo,0.6\n")
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    report = run_report(tmp_path, [])
    assert "## Rounds" not in report and "- none yet" in report


def test_flow_parameters_are_the_params_sections():
    pipeline = _load_flow_module().pipeline
    props = pipeline.parameters.model_dump()["properties"]
    for section in Params.model_fields:
        assert section in props, section
        assert "(empty: keep params.yaml)" in props[section]["description"]
    for name in ("stages", "force", "retries", "save_experiment", "push", "workspace"):
        assert name in props


def test_prefect_yaml_entrypoints_and_parameters_exist_in_the_flow():
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = config["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} == {"alignpipe-process", "kubernetes"}
    for deployment in deployments:
        path, _, name = deployment["entrypoint"].partition(":")
        assert (ROOT / path).exists(), deployment["entrypoint"]
        cwd = os.getcwd()
        try:
            os.chdir(ROOT)
            flow = load_flow_from_entrypoint(deployment["entrypoint"])
        finally:
            os.chdir(cwd)
        assert flow.name == "alignpipe" and name == "pipeline"
        params = deployment.get("parameters") or {}
        assert set(params) <= set(flow.parameters.properties), deployment["name"]
        flow.validate_parameters(params)
        assert deployment["concurrency_limit"] == 1


# ------------------------------------------------------------------ the flow on the tiny pipeline


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def _statuses(results) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in results}


@pytest.mark.slow
def test_flow_runs_in_dvc_order_then_skips_up_to_date_stages(prefect_api, tiny_repo):
    pipeline = _load_flow_module().pipeline
    first = pipeline(workspace=str(tiny_repo))
    assert [r["stage"] for r in first] == ["prepare", "pairs", "dpo"]
    assert _statuses(first) == {"prepare": RAN, "pairs": RAN, "dpo": RAN}
    before = _outputs(tiny_repo)
    again = pipeline(workspace=str(tiny_repo), stages=["pairs"])
    assert _statuses(again) == {"prepare": UP_TO_DATE, "pairs": UP_TO_DATE}
    assert _outputs(tiny_repo) == before

    from prefect.artifacts import Artifact

    table = Artifact.get("alignpipe-stages")
    assert json.loads(table.data) == [
        {"stage": "prepare", "status": UP_TO_DATE, "seconds": again[0]["seconds"], "message": ""},
        {"stage": "pairs", "status": UP_TO_DATE, "seconds": again[1]["seconds"], "message": ""},
    ]


@pytest.mark.slow
def test_param_override_runs_only_downstream_stages(prefect_api, tiny_repo):
    pipeline = _load_flow_module().pipeline
    _dvc(tiny_repo, "repro")
    results = pipeline(workspace=str(tiny_repo), pairs={"seed": 7}, save_experiment="seed-7")
    assert _statuses(results) == {"prepare": UP_TO_DATE, "pairs": RAN, "dpo": RAN}
    assert "pairs pairs.seed=7" in (tiny_repo / "dpo.txt").read_text()
    text = (tiny_repo / "params.yaml").read_text()
    assert text == PARAMS_YAML.replace("  seed: 0          # pairs seed", "  seed: 7          # pairs seed")
    assert "seed-7" in _dvc(tiny_repo, "exp", "list", "--name-only").stdout.split()


GEN = """\
import pathlib, sys, yaml
shards = yaml.safe_load(open("params.yaml"))["generate"]["num_shards"]
if "--shard" in sys.argv:
    i = int(sys.argv[sys.argv.index("--shard") + 1])
    pathlib.Path("shards").mkdir(exist_ok=True)
    pathlib.Path(f"shards/{i}.txt").write_text(f"shard {i}\\n")
else:
    done = [pathlib.Path(f"shards/{i}.txt") for i in range(shards)]
    pathlib.Path("gen.txt").write_text("".join(p.read_text() if p.exists() else "missing\\n" for p in done))
"""


@pytest.mark.slow
def test_generate_shards_run_as_parallel_tasks_before_the_stage_merges_them(prefect_api, tiny_repo):
    (tiny_repo / "gen.py").write_text(GEN)
    with open(tiny_repo / "dvc.yaml", "a") as f:
        f.write("  generate:\n    cmd: python gen.py\n    deps: [gen.py]\n    params: [generate.num_shards]\n"
                "    outs: [gen.txt]\n")  # fmt: skip
    pipeline = _load_flow_module().pipeline
    run = pipeline(workspace=str(tiny_repo), stages=["generate"], generate={"num_shards": 3},
                   generate_shards_parallel=True)  # fmt: skip
    assert _statuses(run) == {"generate": RAN}
    assert (tiny_repo / "gen.txt").read_text() == "shard 0\nshard 1\nshard 2\n"
    before = (tiny_repo / "shards" / "0.txt").stat().st_mtime_ns
    again = pipeline(workspace=str(tiny_repo), stages=["generate"], generate_shards_parallel=True)
    assert _statuses(again) == {"generate": UP_TO_DATE}
    assert (tiny_repo / "shards" / "0.txt").stat().st_mtime_ns == before  # up to date: no shard ran


@pytest.mark.slow
def test_flow_runs_the_rounds_in_dag_order_and_reports_them(prefect_api, tmp_path):
    """rounds.extra's stages (``dpo_round@extra<i>``, by DVC's matrix) run in DAG order, ``dpo_round``
    names them all, and the run's artifacts have the rounds table and the rounds' plots."""
    repo = _rounds_repo(tmp_path / "rounds")
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "rounds")
    pipeline = _load_flow_module().pipeline
    first = pipeline(workspace=str(repo), stages=["dpo_round"], retries={"dpo_round": 1})
    assert [r["stage"] for r in first] == ["dpo", "dpo_round@extra0", "dpo_round@extra1"]
    assert set(_statuses(first).values()) == {RAN}
    assert (repo / "models" / "round-3" / "dpo").read_text() == "dpo\nround-2\nround-3\n"
    full = pipeline(workspace=str(repo))
    assert [(r["stage"], r["status"]) for r in full] == [
        ("dpo", UP_TO_DATE), ("dpo_round@extra0", UP_TO_DATE), ("dpo_round@extra1", UP_TO_DATE),
        ("evaluate", RAN),
    ]  # fmt: skip

    from prefect.artifacts import Artifact

    rounds = json.loads(Artifact.get("alignpipe-rounds").data)
    assert [(r["round"], r["model"], r["win_rate"], r["kl"]) for r in rounds] == [
        (0, "sft", 0.5, 0.0), (1, "dpo_round_1", 0.6, 1.0), (2, "dpo_round_2", 0.7, 2.0), (3, "dpo", 0.8, 3.0),
    ]  # fmt: skip
    report = Artifact.get("alignpipe-report").data
    assert "Stages run: evaluate." in report and "| 3 | dpo | 0.8 | 3 |" in report
    for line in ("- `reports/round-2/dpo/curve.csv`", "- `reports/round-3/dpo/curve.csv`",
                 "- `rounds` (top-level plot: `reports/eval/rounds.csv`)"):  # fmt: skip
        assert line in report, line


@pytest.mark.slow
def test_failing_stage_fails_the_flow_with_its_message(prefect_api, tiny_repo):
    pipeline = _load_flow_module().pipeline
    state = pipeline(workspace=str(tiny_repo), dpo={"beta": 5.0}, retries={"dpo": 1}, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"stage 'dpo' failed: error: tiny dpo: beta 5.0 is too large"):
        state.result()
    from prefect.artifacts import Artifact

    rows = json.loads(Artifact.get("alignpipe-stages").data)
    assert [(r["stage"], r["status"]) for r in rows] == [("prepare", RAN), ("pairs", RAN), ("dpo", "failed")]


# ------------------------------------------------------------------ a real server, a served deployment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            if value := predicate():
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _spawn(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.slow
def test_served_deployment_runs_with_a_parameter_override(tiny_repo, tmp_path):
    import httpx

    _dvc(tiny_repo, "repro")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    logs = tmp_path / "logs"
    logs.mkdir()
    bin_dir = Path(PY).parent
    server = _spawn(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], logs / "server.log",
        env=env,
    )  # fmt: skip
    serve = None
    try:
        _wait(
            lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 120, "prefect server", [server]
        )
        serve = _spawn(
            [PY, "flows/pipeline.py", "--workspace", str(tiny_repo)], logs / "serve.log", cwd=ROOT, env=env
        )
        name = "alignpipe/pipeline"
        _wait(lambda: httpx.get(f"{api}/deployments/name/{name}", timeout=2).status_code == 200, 90, "deployment",
              [server, serve])  # fmt: skip
        deployment = httpx.get(f"{api}/deployments/name/{name}", timeout=5).json()
        assert deployment["parameters"]["dpo"]["learning_rate"] == 5e-6  # the form shows params.yaml
        assert deployment["global_concurrency_limit"]["limit"] == 1
        run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", timeout=10,
                         json={"parameters": {"dpo": {"beta": 0.5}}}).json()  # fmt: skip

        def finished():
            state = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=5).json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = _wait(finished, 120, "the flow run", [server, serve])
        assert state["type"] == "COMPLETED", (state, (logs / "serve.log").read_text()[-3000:])
    finally:
        for proc in (serve, server):
            if proc is not None:
                _stop(proc)
    assert "dpo dpo.beta=0.5" in (tiny_repo / "dpo.txt").read_text()
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    assert params["dpo"] == {"beta": 0.5, "learning_rate": 5e-6}  # the partial override kept the rest
    out = (logs / "serve.log").read_text()
    assert "stage 'prepare': up to date" in out and "stage 'pairs': up to date" in out
    assert "stage 'dpo': ran" in out
