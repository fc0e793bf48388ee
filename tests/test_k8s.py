"""The README's Kubernetes section, run against a real Prefect server (no cluster needed).

The test runs the section's commands (create the pool with a GPU job template, `prefect deploy
--name pipeline-k8s`), reads the deployment back through the API, and has the Kubernetes worker's
own code (prefect-kubernetes) turn a flow run of it into the Job manifest it would submit.
"""

from __future__ import annotations

import asyncio
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

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT_URL, IMAGE = "https://git.example.com/team/alignpipe.git", "registry.example.com/alignpipe:0.1.0"
# The README's commands, in order (the test checks that the README shows each of them).
README_COMMANDS = [
    'pip install -e ".[k8s]"',
    "prefect work-pool get-default-base-job-template --type kubernetes > k8s-job.json",
    "prefect work-pool create kubernetes --type kubernetes --base-job-template k8s-job.json",
    "prefect deploy --name pipeline-k8s",
]
GPU_LIMIT = '"nvidia.com/gpu": 1'


@pytest.fixture()
def k8s_worker() -> None:
    """prefect-kubernetes, which registers the `kubernetes` worker type (the k8s extra)."""
    try:
        import prefect_kubernetes  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("prefect-kubernetes is missing: CI installs the k8s extra (make install-dev)")
        pytest.skip('prefect-kubernetes is not installed (pip install -e ".[k8s]")')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect(*args: str, env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run([str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture()
def server(tmp_path):
    """`prefect server start --host 127.0.0.1` on a free port; yields (API URL, environment)."""
    import httpx

    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}  # fmt: skip
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - the server writes to it until the end
    port = api.rsplit(":", 1)[1].split("/")[0]
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server did not start in 120 s"
            time.sleep(0.5)
        yield api, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _gpu_job_template(default: str) -> str:
    """The README's edit of the default template: one GPU in the container's resource limits."""
    template = json.loads(default)
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = 1
    return json.dumps(template, indent=2)


def _job_manifest(api: str, deployment_id: str) -> dict:
    """What the Kubernetes worker would submit for a new flow run of the deployment."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async def resolve() -> dict:
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(deployment_id)
            pool = await client.read_work_pool("kubernetes")
            config = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                run, client=client, work_pool=pool, worker_name="test"
            )
            return config.job_manifest

    with temporary_settings({PREFECT_API_URL: api}):
        return asyncio.run(resolve())


def test_readme_shows_the_kubernetes_commands_the_test_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### Kubernetes\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    for command in [*README_COMMANDS, GPU_LIMIT]:
        assert command in section, command
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert "pipeline-k8s" in {d["name"] for d in deployments}


@pytest.mark.slow
def test_prefect_deploy_pipeline_k8s_gives_a_gpu_job_with_the_image(k8s_worker, server, tmp_path):
    import httpx

    api, env = server
    project = tmp_path / "project"  # prefect deploy imports the flow from the checkout it runs in
    for name in ("flows", "src"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "prefect.yaml", project / "prefect.yaml")
    env = {**env, "PYTHONPATH": str(project / "src"), "ALIGNPIPE_GIT_URL": GIT_URL, "ALIGNPIPE_IMAGE": IMAGE}

    default = _prefect(
        "work-pool", "get-default-base-job-template", "--type", "kubernetes", env=env, cwd=project
    )
    (project / "k8s-job.json").write_text(_gpu_job_template(default))
    _prefect("work-pool", "create", "kubernetes", "--type", "kubernetes", "--base-job-template", "k8s-job.json",
             env=env, cwd=project)  # fmt: skip
    _prefect("--no-prompt", "deploy", "--name", "pipeline-k8s", env=env, cwd=project)

    pool = httpx.get(f"{api}/work_pools/kubernetes", timeout=10).json()
    assert pool["type"] == "kubernetes"
    deployment = httpx.get(f"{api}/deployments/name/alignpipe/pipeline-k8s", timeout=10).json()
    assert (deployment["work_pool_name"], deployment["work_queue_name"]) == ("kubernetes", "gpu")
    assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["parameters"]["push"] is True  # the pod's workspace is gone after the run
    variables = deployment["job_variables"]
    assert variables == {"image": IMAGE, "namespace": "alignpipe", "env": {"HF_HUB_OFFLINE": "1"},
                         "finished_job_ttl": 3600}  # fmt: skip
    assert set(variables) <= set(pool["base_job_template"]["variables"]["properties"])  # the worker uses each
    clone, workdir, setup = (next(iter(step.values())) for step in deployment["pull_steps"])
    assert (clone["repository"], clone["branch"]) == (GIT_URL, "main")
    assert workdir["directory"] == "{{ clone.directory }}"
    assert "dvc pull" in setup["script"]

    manifest = _job_manifest(api, deployment["id"])
    assert manifest["metadata"]["namespace"] == "alignpipe"
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 3600
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
