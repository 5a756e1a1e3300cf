"""The production cluster files: ray_cluster/kuberay/*.yaml are what KubeRay v1.7.0 and
Kubernetes accept (no field the API server would drop), ray_cluster/cluster.yaml is what
Ray's launcher accepts, and both keep the safety properties below. Each check is also shown
failing on a broken copy, so a check that cannot fail does not pass for one that holds.
No cluster, no network; tests/k8s/checks.py has the checks.

Run alone: .venv/bin/pytest -q -n 0 tests/unit/test_manifests.py
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.k8s import checks

MODEL_DIR = "/mnt/lifecycle/serving/tiny-llm/1"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return checks.load_docs()


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    return checks.load_schemas()


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load(checks.LAUNCHER_FILE.read_text())


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def changed(docs: list[dict[str, Any]], kind: str, change: Any) -> list[dict[str, Any]]:
    """A deep copy of `docs` with `change` applied to the one manifest of `kind`."""
    out = copy.deepcopy(docs)
    change(only(out, kind))
    return out


def test_the_files_name_their_parts(docs, launcher, monkeypatch):
    from ray_cluster.serve import app_from_env

    assert launcher["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 8
    assert {d["kind"] for d in docs} == {"RayCluster", "RayJob", "RayService", "NetworkPolicy"}
    gpu = only(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    (served,) = yaml.safe_load(only(docs, "RayService")["spec"]["serveConfigV2"])["applications"]
    assert served["import_path"] == "ray_cluster.serve:app_from_env"
    assert served["runtime_env"]["env_vars"]["LIFECYCLE_SERVE_MODEL_DIR"] == MODEL_DIR
    # The builder reads the API key where it runs (a RayService node): none, no app.
    monkeypatch.delenv("LIFECYCLE_API_KEY", raising=False)
    monkeypatch.delenv("LIFECYCLE_SERVE_ALLOW_UNAUTHENTICATED", raising=False)
    with pytest.raises(ValueError, match=r"LIFECYCLE_API_KEY is not set where the app is built"):
        app_from_env({"model_dir": "/models/m", "model_id": "m"})
    monkeypatch.setenv("LIFECYCLE_API_KEY", "k" * 32)
    app = app_from_env({"model_dir": "/models/m", "model_id": "m"})
    assert app._bound_deployment.name == "LLMServer"
    monkeypatch.delenv("LIFECYCLE_SERVE_MODEL_DIR", raising=False)
    with pytest.raises(ValueError, match="model_dir"):
        app_from_env({})


# ------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------


def test_manifests_match_the_kuberay_crds_and_the_kubernetes_models(docs, schemas):
    assert [e for d in docs for e in checks.manifest_errors(d, schemas)] == []


def test_the_pruned_crd_schema_stays_small_and_marks_the_pod_templates(schemas):
    assert checks.SCHEMA_FILE.stat().st_size < 200_000
    spec = schemas["RayService"]["properties"]["spec"]["properties"]
    group = spec["rayClusterConfig"]["properties"]["workerGroupSpecs"]["items"]
    assert group["properties"]["template"] == {"x-k8s-model": "V1PodTemplateSpec"}
    assert spec["serveService"] == {"x-k8s-model": "V1Service"}
    job = schemas["RayJob"]["properties"]["spec"]["properties"]
    assert job["submitterPodTemplate"] == {"x-k8s-model": "V1PodTemplateSpec"}


def test_a_misspelled_or_mistyped_kuberay_field_is_reported_by_path(docs, schemas):
    rc = copy.deepcopy(only(docs, "RayCluster"))
    group = rc["spec"]["workerGroupSpecs"][0]
    group["rayStartParms"] = group.pop("rayStartParams")
    group["maxReplicas"] = "8"
    rc["spec"]["authOptions"]["mode"] = "tokens"
    errors = checks.manifest_errors(rc, schemas)
    assert any(
        "spec.workerGroupSpecs[0].rayStartParms: not a field of the CRD" in e for e in errors
    )
    assert any("spec.workerGroupSpecs[0].maxReplicas: '8' is a str" in e for e in errors)
    assert any("spec.authOptions.mode: 'tokens' is not one of" in e for e in errors)
    assert len(errors) == 3


def test_a_misspelled_or_mistyped_kubernetes_field_is_reported_by_path(docs, schemas):
    svc = copy.deepcopy(only(docs, "RayService"))
    template = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    template["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    template["metadata"]["labels"]["llm-lifecycle/client"] = True  # labels are strings
    errors = checks.manifest_errors(svc, schemas)
    path = "spec.rayClusterConfig.workerGroupSpecs[0].template"
    assert (
        f"RayService/llm-lifecycle-serve: {path}.spec.containers[0].imagePullPolcy: not a field of V1PodTemplateSpec (it would be dropped)"
        in errors
    )
    assert any(
        f"{path}.metadata.labels.llm-lifecycle/client: True is the wrong type" in e for e in errors
    )
    del template["spec"]["containers"][0]["name"]  # required
    assert any(
        "not a valid V1PodTemplateSpec" in e and "`name`" in e
        for e in checks.manifest_errors(svc, schemas)
    )
    policy = copy.deepcopy(next(d for d in docs if d["kind"] == "NetworkPolicy"))
    policy["spec"]["podSelectr"] = policy["spec"].pop("podSelector")
    assert any(
        "spec.podSelectr: not a field of V1NetworkPolicy" in e
        for e in checks.manifest_errors(policy, schemas)
    )


def test_a_misspelled_serve_config_key_is_reported(docs, schemas):
    def typo(svc):
        svc["spec"]["serveConfigV2"] = svc["spec"]["serveConfigV2"].replace(
            "max_queued_requests", "max_queue_requests"
        )

    errors = checks.manifest_errors(only(changed(docs, "RayService", typo), "RayService"), schemas)
    assert errors == [
        "RayService/llm-lifecycle-serve: spec.serveConfigV2.applications[0].deployments[0].max_queue_requests: not a field of Serve's DeploymentSchema"
    ]


# ------------------------------------------------------------------------------------------
# Safety
# ------------------------------------------------------------------------------------------


def test_every_pod_that_can_run_a_serve_replica_mounts_the_model(docs):
    assert checks.serve_mount_errors(docs) == []
    # The GPU group can run LLMServer (num_gpus 1, gpu_node 1); the head (num-cpus 0) cannot.
    pods = [p for p in checks.pods(docs) if p.cluster and p.cluster.owner["kind"] == "RayService"]
    opts = {"num_cpus": 4, "num_gpus": 1, "resources": {"gpu_node": 1}}
    assert [p.where for p in pods if checks.can_host(p, opts)] == [
        "RayService/llm-lifecycle-serve spec.rayClusterConfig.workerGroupSpecs[0] (gpu)"
    ]

    def unmount(svc):
        pod = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
        del pod["containers"][0]["volumeMounts"], pod["volumes"]

    assert checks.serve_mount_errors(changed(docs, "RayService", unmount)) == [
        "RayService/llm-lifecycle-serve spec.rayClusterConfig.workerGroupSpecs[0] (gpu): can run "
        f"LLMServer replicas but mounts no volume at {MODEL_DIR} or a parent of it"
    ]


def test_the_api_key_comes_from_a_secret_wherever_the_serve_app_is_built(docs):
    assert checks.api_key_errors(docs) == []

    def drop(svc):
        svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
            "env"
        ] = []

    errors = checks.api_key_errors(changed(docs, "RayService", drop))
    assert len(errors) == 1 and "workerGroupSpecs[0] (gpu): no LIFECYCLE_API_KEY" in errors[0]


def test_token_auth_is_on_for_every_ray_cluster_through_kuberay(docs):
    assert checks.auth_errors(docs) == []

    def off(svc):
        del svc["spec"]["rayClusterConfig"]["authOptions"]
        head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        head["env"] = [{"name": "RAY_AUTH_MODE", "value": "disabled"}]

    errors = checks.auth_errors(changed(docs, "RayService", off))
    assert errors == [
        "RayService/llm-lifecycle-serve spec.rayClusterConfig.authOptions: mode is None, not 'token'",
        "RayService/llm-lifecycle-serve spec.rayClusterConfig.headGroupSpec containers[0] (ray-head): sets RAY_AUTH_MODE by hand",
    ]


def test_every_pod_and_container_runs_restricted(docs):
    assert checks.security_context_errors(docs) == []

    def loosen(job):
        pod = job["spec"]["submitterPodTemplate"]["spec"]
        del pod["securityContext"]["runAsNonRoot"]
        pod["containers"][0]["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}

    assert checks.security_context_errors(changed(docs, "RayJob", loosen)) == [
        "RayJob/llm-lifecycle-full spec.submitterPodTemplate securityContext: runAsNonRoot is not true",
        "RayJob/llm-lifecycle-full spec.submitterPodTemplate containers[0] (ray-job-submitter) securityContext: capabilities do not drop ALL",
        "RayJob/llm-lifecycle-full spec.submitterPodTemplate containers[0] (ray-job-submitter) securityContext: adds capabilities ['NET_ADMIN']",
    ]


def test_a_network_policy_selects_every_pod_and_lets_only_its_cluster_in_on_every_port(docs):
    assert checks.network_policy_errors(docs) == []
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    (svc_policy,) = [p for p in policies if p["metadata"]["name"] == "llm-lifecycle-rayservice"]
    others = [d for d in docs if d is not svc_policy]
    # KubeRay names the RayService's cluster <name>-<random>: its ray.io/cluster label is no use.
    naive = copy.deepcopy(svc_policy)
    naive["spec"]["podSelector"] = {"matchLabels": {"ray.io/cluster": "llm-lifecycle-serve"}}
    for broken in (others, [*others, naive]):
        errors = checks.network_policy_errors(broken)
        assert len(errors) == 2
        assert all(
            e.startswith("RayService/llm-lifecycle-serve") and "no NetworkPolicy selects" in e
            for e in errors
        )
    # A rule open to every pod of the namespace lets the other cluster in on every port.
    wide = copy.deepcopy(svc_policy)
    wide["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]
    errors = checks.network_policy_errors([*others, wide])
    assert len(errors) == 2 and all("let another Ray cluster in" in e for e in errors)


def test_mlflow_is_https_and_its_credentials_come_from_a_secret(docs):
    assert checks.mlflow_errors(docs) == []

    def plain(job):
        job["spec"]["entrypoint"] += " --set tracking.tracking_uri=http://mlflow.mlops.svc:5000"

    assert checks.mlflow_errors(changed(docs, "RayJob", plain))[0].startswith(
        "RayJob/llm-lifecycle-full spec.entrypoint: MLflow on the command line"
    )

    def leak(rc):
        worker = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        worker["env"] = [
            {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.mlops.svc:5000"},
            {"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"},
        ]

    where = "RayCluster/llm-lifecycle spec.workerGroupSpecs[0] (gpu)"
    assert checks.mlflow_errors(changed(docs, "RayCluster", leak)) == [
        f"{where} containers[0] (ray-worker): MLFLOW_TRACKING_URI 'http://mlflow.mlops.svc:5000' is not https://",
        f"{where}: MLFLOW_TRACKING_USERNAME is not taken from a Secret",
        f"{where}: MLFLOW_TRACKING_PASSWORD is not taken from a Secret",
    ]


def test_no_secret_values_in_the_manifests(docs):
    assert checks.secret_value_errors(docs) == []
    assert not checks.is_secret_name("LIFECYCLE_WATERMARK_KEY_FILE")  # a path to a secret

    def literal(svc):
        head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        head["env"] = [{"name": "LIFECYCLE_API_KEY", "value": "k"}]
        svc["spec"]["serveConfigV2"] = svc["spec"]["serveConfigV2"].replace(
            "VLLM_CPU_KVCACHE_SPACE", "HF_TOKEN"
        )

    assert checks.secret_value_errors(changed(docs, "RayService", literal)) == [
        "RayService/llm-lifecycle-serve spec.rayClusterConfig.headGroupSpec containers[0] (ray-head) env LIFECYCLE_API_KEY: a literal value",
        "RayService/llm-lifecycle-serve app 'lifecycle' runtime_env: HF_TOKEN (stored in the custom resource in plain text)",
    ]

    def in_uri(job):
        job["spec"]["entrypoint"] += " --set tracking.tracking_uri=https://u:pw@mlflow.mlops.svc"

    errors = checks.secret_value_errors(changed(docs, "RayJob", in_uri))
    assert errors == ["RayJob/llm-lifecycle-full spec.entrypoint: a URI with a password"]

    def on_the_command_line(job):
        job["spec"]["entrypoint"] += " --set deploy.serve.api_key=abc"

    errors = checks.secret_value_errors(changed(docs, "RayJob", on_the_command_line))
    assert len(errors) == 1 and "spec.entrypoint: a secret on the command line" in errors[0]


def test_the_launcher_file_passes_rays_schema_and_distributes_the_token(launcher):
    assert checks.launcher_errors(launcher) == []
    broken = copy.deepcopy(launcher)
    del broken["file_mounts"]["~/.ray/auth_token"]
    broken["head_start_ray_commands"][1] = broken["head_start_ray_commands"][1].replace(
        "127.0.0.1", "0.0.0.0"
    )
    broken["worker_start_ray_commands"][1] = "ray start --address=$RAY_HEAD_IP:6379"
    broken["available_node_types"]["head"]["min_worker"] = 0
    assert checks.launcher_errors(broken) == [
        "cluster.yaml: Ray's launcher rejects it: Additional properties are not allowed ('min_worker' was unexpected)",
        "cluster.yaml file_mounts: ~/.ray/auth_token is not distributed to the nodes",
        "cluster.yaml head_start_ray_commands[1]: the dashboard listens on 0.0.0.0",
        "cluster.yaml worker_start_ray_commands[1]: `ray start` without RAY_AUTH_MODE=token",
        "cluster.yaml: a `ray start` that does not read the env file with MLflow's settings",
    ]
