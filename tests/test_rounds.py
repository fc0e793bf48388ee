"""Iterative DPO rounds: params checks, the default DAG unchanged, and a 2-round tiny DAG end to end
(a round-2 dpo knob reruns round 2's generate, ref_logps and dpo, and evaluate; round 2's dpo resumes after a
SIGKILL). The round stages are DVC matrix members: entry i of rounds.extra is <step>@extra<i>."""

from __future__ import annotations

import csv
import json
import re
import shutil

import pytest
import yaml
from faults import TINY, artifact_digests, file_appears, run_process, stage_argv
from workspace import ROOT, dvc, env, make_workspace, ran_stages

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet
from alignpipe.evaluate.rounds import round_rows, rounds_markdown, with_rounds
from alignpipe.params import Params, ParamsError, for_round, load_section, round_policy, validate
from alignpipe.round_prompts import fresh_subset

DEFAULT_STAGES = ["base_model", "prepare", "sft", "generate", "reward_model", "score", "pairs", "ref_logps",
                  "dpo", "evaluate"]  # fmt: skip
ROUND_STEPS = [
    "round_prompts",
    "generate_round",
    "score_round",
    "pairs_round",
    "ref_logps_round",
    "dpo_round",
]


def two_rounds(**round2) -> dict:
    item = {"name": "round-2", "previous": "models/dpo", "generate": {}, "dpo": {}, **round2}
    return {"rounds": {"final": "models/round-2/dpo", "extra": [item]}}


def three_rounds() -> dict:
    second = {
        "name": "round-3",
        "previous": "models/round-2/dpo",
        "generate": {"seed": 2},
        "dpo": {"beta": 0.2},
    }
    return {"rounds": {"final": "models/round-3/dpo", "extra": [*two_rounds()["rounds"]["extra"], second]}}


def set_rounds(workspace, params: dict) -> None:
    """Replace keys of the rounds section (set_params merges dicts, so it cannot take an override away)."""
    path = workspace / "params.yaml"
    data = yaml.safe_load(path.read_text())
    data["rounds"].update(params["rounds"])
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def rendered(workspace) -> dict:
    """Stage name -> (cmd, deps, outs, params) as DVC renders dvc.yaml with the workspace's params."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        return {
            s.name: (
                s.cmd,
                sorted(d.def_path for d in s.deps if not isinstance(d, ParamsDependency)),
                sorted(o.def_path for o in s.outs),
                sorted(k for d in s.deps if isinstance(d, ParamsDependency) for k in d.params),
            )
            for s in repo.index.stages
        }


# --------------------------------------------------------------------------------------------- fast


def test_default_params_render_todays_stages_as_the_committed_lock_has_them():
    """One round (rounds.extra: []): no round stage exists, and every stage's cmd, deps and outs are the
    ones dvc.lock recorded, so the committed baseline stays valid."""
    stages = rendered(ROOT)
    assert sorted(stages) == sorted(DEFAULT_STAGES)
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    for name, (cmd, deps, outs, params) in stages.items():
        assert " ".join(cmd.split()) == " ".join(lock[name]["cmd"].split()), name
        assert deps == sorted(d["path"] for d in lock[name].get("deps", [])), name
        assert set(outs) == {o["path"] for o in lock[name].get("outs", [])}, name
        assert set(params) == set(lock[name].get("params", {}).get("params.yaml", {})), name


def test_two_rounds_add_one_stage_per_step_and_evaluate_reads_the_last_policy(tmp_path):
    ws = make_workspace(tmp_path / "ws", two_rounds())
    stages = rendered(ws)
    assert sorted(stages) == sorted(DEFAULT_STAGES + [f"{s}@extra0" for s in ROUND_STEPS])
    cmd, deps, _, params = stages["dpo_round@extra0"]
    assert "--model models/dpo" in cmd and "--out models/round-2/dpo" in cmd and "models/dpo" in deps
    assert "--round round-2" in cmd and "--checkpoints checkpoints/round-2/dpo" in cmd
    assert params == ["dpo", "rounds.extra"]  # DVC keys a list by index only: the whole list
    assert " ".join(stage_argv(ws, "dpo_round@extra0")[1:]) == " ".join(cmd.split()[1:])
    assert stages["generate_round@extra0"][2] == [
        "data/round-2/generations",
        "reports/round-2/generate.json",
    ]
    cmd, deps, *_ = stages["evaluate"]
    assert "--dpo models/round-2/dpo" in cmd and "models/round-2/dpo" in deps and "models/dpo" not in deps
    dag = dvc(ws, "dag", "--dot").stdout
    assert '"dpo" -> "generate_round@extra0"' in dag and '"dpo_round@extra0" -> "evaluate"' in dag


def test_three_rounds_chain_their_policies(tmp_path):
    ws = make_workspace(tmp_path / "ws", three_rounds())
    stages = rendered(ws)
    assert sorted(stages) == sorted(DEFAULT_STAGES + [f"{s}@extra{i}" for s in ROUND_STEPS for i in (0, 1)])
    cmd, deps, outs, _ = stages["dpo_round@extra1"]
    assert "--model models/round-2/dpo --round round-3" in " ".join(cmd.split())
    assert "models/round-2/dpo" in deps and outs[0] == "models/round-3/dpo"
    assert stages["evaluate"][1].count("models/round-3/dpo") == 1
    dag = dvc(ws, "dag", "--dot").stdout
    assert (
        '"dpo_round@extra0" -> "generate_round@extra1"' in dag and '"dpo_round@extra1" -> "evaluate"' in dag
    )


@pytest.mark.parametrize(
    ("rounds", "expected"),
    [
        ({"final": "models/round-2/dpo", "extra": [{"name": "round-3", "previous": "models/dpo"}]},
         "rounds.extra.0.name: 'round-3' should be 'round-2'"),
        ({**three_rounds()["rounds"], "extra": [three_rounds()["rounds"]["extra"][0]] * 2},
         "rounds.extra.1.name: 'round-2' should be 'round-3'"),  # a name twice
        ({"final": "models/round-2/dpo", "extra": [{"name": "round-2", "previous": "models/sft"}]},
         "rounds.extra.0.previous (round-2): 'models/sft' should be 'models/dpo'"),
        ({"extra": [{"name": "round-2", "previous": "models/dpo"}]},
         "rounds.final: 'models/dpo' should be 'models/round-2/dpo'"),
        ({"final": "models/round-2/dpo", "extra": [{"name": "round-2", "previous": "models/dpo",
                                                    "dpo": {"betta": 1}}]},
         "rounds.extra.0.dpo.betta: unknown key (did you mean 'beta'?)"),
        ({"final": "models/round-2/dpo", "extra": [{"name": "round-2", "previous": "models/dpo", "seed": 1}]},
         "rounds.extra.0.seed: unknown key (valid keys: name, previous, generate, dpo)"),
        ({"final": "models/round-2/dpo", "extra": {"round-2": {"previous": "models/dpo"}}},
         "rounds.extra: a list of rounds, one entry per round: - {name: round-2, previous: models/dpo"),
        ({"reference": "parent"}, "rounds.reference"),
    ],
)  # fmt: skip
def test_bad_rounds_name_the_key(rounds, expected):
    with pytest.raises(ParamsError, match=re.escape(expected)):
        validate(Params, {"rounds": rounds})


def test_a_live_reference_cannot_be_sft_in_later_rounds():
    with pytest.raises(ParamsError, match="dpo.reference: live"):
        validate(Params, {**two_rounds(), "dpo": {"reference": "live"}})


def test_round_overrides_merge_over_the_section(tmp_path):
    path = tmp_path / "params.yaml"
    params = two_rounds(generate={"seed": 7}, dpo={"beta": 0.25, "peft": {"r": 4}})
    path.write_text(yaml.safe_dump({"dpo": {"beta": 0.1, "max_steps": 5, "peft": {"alpha": 8}}, **params}))
    dpo = load_section("dpo", path)
    assert for_round(dpo, None, path) is dpo
    merged = for_round(dpo, "round-2", path)
    assert (merged.beta, merged.max_steps, merged.peft.r, merged.peft.alpha) == (0.25, 5, 4, 8)
    assert for_round(load_section("generate", path), "round-2", path).seed == 7
    with pytest.raises(ParamsError, match="no round named 'round-3'"):
        for_round(dpo, "round-3", path)
    assert [round_policy(k) for k in (1, 2, 3)] == ["models/dpo", "models/round-2/dpo", "models/round-3/dpo"]


def test_fresh_prompts_are_a_stable_different_subset_per_round():
    rows = [{"prompt_id": f"p{i}"} for i in range(40)]
    two, again, three = (fresh_subset(rows, k, 0.25) for k in ("round-2", "round-2", "round-3"))
    assert len(two) == len(three) == 10 and two == again and two != three
    assert [r["prompt_id"] for r in two] == sorted((r["prompt_id"] for r in two), key=lambda p: int(p[1:]))
    assert len(fresh_subset(rows[:3], "round-2", 0.01)) == 1


def test_rounds_table_lists_sft_then_each_round():
    entry = {"pass_rate": 0.5, "win_rate": 0.5, "win_rate_ci": [0.5, 0.5]}
    metrics = {"sft": entry, "dpo_round_1": {"pass_rate": 0.6, "win_rate": 0.7, "win_rate_ci": [0.6, 0.8],
               "kl": 1.5}, "dpo": {"pass_rate": 0.7, "win_rate": 0.8, "win_rate_ci": None}, "kl": 2.5}  # fmt: skip
    models = with_rounds(["sft", "dpo"], ["dpo_round_1"])
    assert models == ["sft", "dpo_round_1", "dpo"]
    rows = round_rows(metrics, models)
    assert [(r["round"], r["model"], r["kl"]) for r in rows] == [(0, "sft", 0.0), (1, "dpo_round_1", 1.5),
                                                                 (2, "dpo", 2.5)]  # fmt: skip
    assert rows[2]["win_rate_low"] == "" and "| 2 | dpo | 0.700 | 0.800 [n/a, n/a] | 2.5000 |" in "\n".join(
        rounds_markdown(metrics, models)
    )
    assert rounds_markdown(metrics, ["sft", "dpo"]) == []  # one round: no rounds table


# --------------------------------------------------------------------------------- end to end (dvc)

# faults.TINY (dpo: 9 steps x 2 epochs, a checkpoint every 3 steps), one short dpo epoch per round
ROUND_TINY = {
    **TINY,
    "sft": {**TINY["sft"], "epochs": 1},
    "generate": {**TINY["generate"], "max_new_tokens": 16},
    "dpo": {**TINY["dpo"], "epochs": 1},
    "evaluate": {**TINY["evaluate"], "max_new_tokens": 8, "n_examples": 1, "forgetting_rows": 4,
                 "bootstrap_resamples": 100},
}  # fmt: skip


@pytest.mark.slow
def test_two_rounds_end_to_end_then_a_round_2_knob_then_a_killed_round_2(tmp_path, tiny_model_dir):
    ws = make_workspace(
        tmp_path / "ws",
        {**ROUND_TINY, "base_model": {"source": str(tiny_model_dir)}, **two_rounds(generate={"seed": 1})},
    )
    first = dvc(ws, "repro")
    assert sorted(ran_stages(first.stdout)) == sorted(DEFAULT_STAGES + [f"{s}@extra0" for s in ROUND_STEPS])
    assert (ws / "models/round-2/dpo/model.safetensors").exists()
    assert read_parquet(ws / "data/round-2/prompts.parquet", schema.PROMPTS) == read_parquet(
        ws / "data/prepared/prompts.parquet", schema.PROMPTS
    )  # rounds.prompts: same
    eval_json = json.loads((ws / "reports/eval.json").read_text())
    assert {"sft", "dpo", "dpo_round_1"} <= set(eval_json) and "dpo_round_2" not in eval_json
    assert eval_json["dpo"]["samples"] == eval_json["dpo_round_1"]["samples"] == eval_json["prompts"]
    assert eval_json["dpo_round_1"]["kl"] is not None and len(eval_json["dpo"]["win_rate_ci"]) == 2
    with (ws / "reports/eval/rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["round"], r["model"]) for r in rows] == [("0", "sft"), ("1", "dpo_round_1"), ("2", "dpo")]
    assert float(rows[2]["kl"]) == pytest.approx(eval_json["kl"])
    md = (ws / "reports/eval.md").read_text()
    assert "## Rounds" in md and "DPO round 1 (reward" in md  # answers side by side across rounds
    status = dvc(ws, "status")
    assert status.stdout.strip().endswith("up to date."), (status.stdout, (ws / "params.yaml").read_text())
    assert dvc(ws, "plots", "show", "--json").returncode == 0

    # a round-2 dpo knob. DVC keys params into a list by index only, so the round stages track rounds.extra
    # whole: generate_round reruns too, finds its finished chunks (same fingerprint) and leaves the same
    # generations, so score_round and pairs_round stay cached; ref_logps_round reads the round's dpo lengths
    generations = artifact_digests(ws, ["data/round-2/generations"])
    policy = artifact_digests(ws, ["models/round-2/dpo"])
    set_rounds(ws, two_rounds(generate={"seed": 1}, dpo={"beta": 0.2}))
    knob = dvc(ws, "repro")
    assert sorted(ran_stages(knob.stdout)) == [
        "dpo_round@extra0",
        "evaluate",
        "generate_round@extra0",
        "ref_logps_round@extra0",
    ]
    assert artifact_digests(ws, ["data/round-2/generations"]) == generations
    assert artifact_digests(ws, ["models/round-2/dpo"]) != policy  # beta 0.2 trained another policy
    assert (
        "rounds.extra"
        in yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["dpo_round@extra0"]["params"][
            "params.yaml"
        ]
    )
    assert dvc(ws, "status").stdout.strip().endswith("up to date.")

    # kill round 2's dpo after its first checkpoint; the rerun resumes and ends as the uninterrupted run
    outs = ("models/round-2/dpo", "reports/round-2/dpo/metrics.json")
    straight = artifact_digests(ws, outs)
    shutil.rmtree(ws / "checkpoints/round-2/dpo")
    argv = stage_argv(ws, "dpo_round@extra0")  # dvc.yaml's cmd with entry 0 of rounds.extra filled in
    trigger = file_appears(ws, "checkpoints/round-2/dpo/step-*/trainer_state.json")
    for attempt, delay in enumerate((0.5, 0.1, 0.0)):
        killed = run_process(argv, ws, {**env(), "PYTHONPATH": str(ws / "src")}, tmp_path / f"kill{attempt}.log",
                             trigger=trigger, kill_after=delay)  # fmt: skip
        if killed.killed:
            break
        shutil.rmtree(ws / "checkpoints/round-2/dpo")
    assert killed.killed, killed.log[-2000:]
    # forced: the lock and the cache still have the finished model, which DVC would just check out
    resumed = dvc(ws, "repro", "--force", "--single-item", "dpo_round@extra0")
    assert ran_stages(resumed.stdout) == ["dpo_round@extra0"]
    assert "dpo: resuming from" in resumed.stdout + resumed.stderr
    assert artifact_digests(ws, outs) == straight
    assert ran_stages(dvc(ws, "repro").stdout) == []  # the same policy: evaluate stays up to date

    # the options: a previous-policy reference reruns round 2 from its reference pass, fresh prompts from
    # its prompts (a dry run lists the stages whose own inputs changed; the next ones follow their outputs)
    ref_sft = (ws / "data/round-2/ref_logps.parquet").read_bytes()
    set_rounds(ws, {"rounds": {"reference": "previous"}})
    assert sorted(ran_stages(dvc(ws, "repro", "--dry").stdout)) == ["evaluate", "ref_logps_round@extra0"]
    dvc(ws, "repro", "-s", "ref_logps_round@extra0")
    assert (ws / "data/round-2/ref_logps.parquet").read_bytes() != ref_sft  # scored under models/dpo now
    assert "dpo_round@extra0:\n\tchanged deps:" in dvc(ws, "status").stdout
    set_rounds(ws, {"rounds": {"prompts": "fresh"}})
    stale = ["dpo_round@extra0", "evaluate", "round_prompts@extra0"]  # dpo_round: the new reference's
    assert sorted(ran_stages(dvc(ws, "repro", "--dry").stdout)) == stale
    dvc(ws, "repro", "-s", "round_prompts@extra0")
    fresh = read_parquet(ws / "data/round-2/prompts.parquet", schema.PROMPTS)
    assert len(fresh) == 6  # rounds.fresh_fraction 0.5 of data.builtin.n_prompts 12
    assert "generate_round@extra0:\n\tchanged deps:" in dvc(ws, "status").stdout
