"""Checks for the production cluster files: KubeRay manifests against KubeRay's CRD schema and
the official `kubernetes` client's models, and the safety properties they must keep.

Every check returns a list of errors (empty: fine), each naming where: the manifest
(`RayService/llm-lifecycle-serve`) and the field path (`spec.workerGroupSpecs[0].template`).
tests/unit/test_manifests.py runs them; `python -m tests.k8s.checks` prints them.

Structure:
- `schema_errors`: a manifest against the pruned CRD schema (tests/k8s/kuberay-v1.7.0.json,
  written by scripts/kuberay_schema.py). An unknown key is an error: the API server drops
  unknown fields of a structural schema without a word, so a misspelled field is a silently
  missing setting.
- `model_errors`: an embedded Kubernetes object (pod template, Service, NetworkPolicy...)
  through the `kubernetes` client's model and back; what does not come back is a field the
  model does not have (or of the wrong type).
Safety: `serve_mount_errors`, `api_key_errors`, `auth_errors`, `security_context_errors`,
`network_policy_errors`, `mlflow_errors`, `secret_value_errors`, `launcher_errors`.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY_DIR = ROOT / "ray_cluster" / "kuberay"
LAUNCHER_FILE = ROOT / "ray_cluster" / "cluster.yaml"
SCHEMA_FILE = Path(__file__).with_name("kuberay-v1.7.0.json")

Doc = dict[str, Any]

# Names whose values are secrets; a name ending in _FILE/_PATH/_DIR points at one instead.
SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL", re.I)
POINTER_SUFFIXES = ("_FILE", "_PATH", "_DIR")
# `name=value` on a command line or in an entrypoint (`--set a.b=c`, `VAR=value cmd`).
ASSIGNMENT = re.compile(r"([\w.-]+)=\S")
# A URI carrying a password: scheme://user:pass@host.
URI_WITH_PASSWORD = re.compile(r"\b[a-z][\w+.-]*://[^/\s:@]+:[^/\s@]+@", re.I)
# Fields holding Kubernetes quantities: YAML may write them as numbers (`nvidia.com/gpu: 8`),
# the client's models as strings; both are fine for the API server.
QUANTITY_MAPS = {"limits", "requests", "overhead", "capacity", "hard"}
QUANTITY_FIELDS = {"sizeLimit", "divisor"}
# Labels KubeRay puts on every Ray pod (ray-operator/controllers/ray/common/pod.go labelPod).
# The first three cannot be overridden by the template's labels.
FIXED_RAY_LABELS = ("ray.io/cluster", "ray.io/node-type", "ray.io/group")


def load_docs(folder: Path = KUBERAY_DIR) -> list[Doc]:
    """Every YAML document in `folder`'s *.yaml files, in file order."""
    docs: list[Doc] = []
    for path in sorted(folder.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def load_schemas(path: Path = SCHEMA_FILE) -> dict[str, Any]:
    """{kind: pruned openAPIV3Schema} for RayCluster, RayJob and RayService."""
    return json.loads(path.read_text())["kinds"]


def name_of(doc: Doc) -> str:
    """`Kind/name` of a manifest."""
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ------------------------------------------------------------------------------------------
# Structure: KubeRay's CRD schema and the Kubernetes client's models
# ------------------------------------------------------------------------------------------

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name != "boolean":
        return False
    return isinstance(value, _TYPES.get(name, (object,)))


def schema_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """`value` against a pruned CRD schema node: unknown keys, types, enums, bounds, required
    keys; nodes marked {"x-k8s-model": ...} go to `model_errors`."""
    if "x-k8s-model" in schema:
        return model_errors(value, schema["x-k8s-model"], path)
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            return [f"{path}: {value!r} is neither an integer nor a string"]
        return []
    want = schema.get("type")
    if want and not _is_type(value, want):
        return [f"{path}: {value!r} is a {type(value).__name__}, the CRD wants {want}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value!r} is below the minimum {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {value!r} is above the maximum {schema['maximum']}")
    if isinstance(value, dict):
        errors += [
            f"{_join(path, k)}: required" for k in schema.get("required", []) if k not in value
        ]
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            here = _join(path, key)
            if key in props:
                errors += schema_errors(sub, props[key], here)
            elif isinstance(extra, dict):
                errors += schema_errors(sub, extra, here)
            elif not (extra is True or schema.get("x-kubernetes-preserve-unknown-fields")):
                errors.append(f"{here}: not a field of the CRD (the API server would drop it)")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors


@functools.cache
def _api_client() -> Any:
    from kubernetes.client import ApiClient

    return ApiClient()


def model_errors(value: Any, model: str, path: str = "") -> list[str]:
    """`value` through the `kubernetes` client's `model` (e.g. "V1PodTemplateSpec") and back:
    a key that does not come back is not a field of the model (deserialisation drops it), a
    value that comes back different has the wrong type; required fields missing raise in the
    models' constructors."""
    api = _api_client()
    try:
        obj = api._ApiClient__deserialize(value, model)
    except (ValueError, TypeError, AttributeError) as e:
        return [f"{path or '.'}: not a valid {model}: {e}"]
    return _diff(value, api.sanitize_for_serialization(obj), path, model, "")


def _diff(orig: Any, back: Any, path: str, model: str, key: str) -> list[str]:
    if isinstance(orig, dict):
        if not isinstance(back, dict):
            return [f"{path}: an object where {model} wants {type(back).__name__}"]
        errors = []
        for k, v in orig.items():
            here = _join(path, k)
            if k not in back:
                errors.append(f"{here}: not a field of {model} (it would be dropped)")
            elif key in QUANTITY_MAPS and _same_quantity(v, back[k]):
                continue
            else:
                errors += _diff(v, back[k], here, model, k)
        return errors
    if isinstance(orig, list):
        if not isinstance(back, list) or len(back) != len(orig):
            return [f"{path}: a list where {model} wants {type(back).__name__}"]
        return [
            e
            for i, (o, b) in enumerate(zip(orig, back, strict=True))
            for e in _diff(o, b, f"{path}[{i}]", model, key)
        ]
    if type(orig) is type(back) and orig == back:
        return []
    if key in QUANTITY_FIELDS and _same_quantity(orig, back):
        return []
    return [f"{path}: {orig!r} is the wrong type for {model} (it comes back as {back!r})"]


def _same_quantity(orig: Any, back: Any) -> bool:
    return orig == back or (
        isinstance(orig, int | float) and not isinstance(orig, bool) and back == str(orig)
    )


def manifest_errors(doc: Doc, schemas: dict[str, Any]) -> list[str]:
    """One manifest's structure: a KubeRay kind against its CRD schema, any other kind
    (NetworkPolicy, Service...) against the `kubernetes` client's model."""
    kind, api_version = doc.get("kind", ""), doc.get("apiVersion", "")
    if api_version.startswith("ray.io/"):
        if kind not in schemas:
            return [f"{name_of(doc)}: no CRD schema for kind {kind!r}"]
        errors = schema_errors(doc, schemas[kind])
    else:
        version = api_version.rsplit("/", 1)[-1]
        errors = model_errors(doc, version[:1].upper() + version[1:] + kind)
    if kind == "RayService" and isinstance(doc.get("spec", {}).get("serveConfigV2"), str):
        errors += serve_config_errors(doc["spec"]["serveConfigV2"], "spec.serveConfigV2")
    return [f"{name_of(doc)}: {e}" for e in errors]


def serve_config_errors(text: str, path: str) -> list[str]:
    """A serveConfigV2 against Ray Serve's own schema, and no keys it does not know (Serve's
    schema lets unknown deployment and application keys through)."""
    from pydantic import BaseModel, ValidationError
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    config = yaml.safe_load(text)
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        return [f"{path}: {e}"]

    def unknown(d: dict[str, Any], model: type[BaseModel], where: str) -> list[str]:
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        return [
            f"{where}.{k}: not a field of Serve's {model.__name__}" for k in d if k not in known
        ]

    errors = unknown(config, ServeDeploySchema, path)
    for i, app in enumerate(config.get("applications", [])):
        where = f"{path}.applications[{i}]"
        errors += unknown(app, ServeApplicationSchema, where)
        for j, dep in enumerate(app.get("deployments", [])):
            errors += unknown(dep, DeploymentSchema, f"{where}.deployments[{j}]")
    return errors


# ------------------------------------------------------------------------------------------
# What the manifests make KubeRay create: Ray clusters and their pods
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayClusterRef:
    """A Ray cluster spec in a manifest, and the name KubeRay gives the RayCluster."""

    where: str  # "RayService/llm-lifecycle-serve spec.rayClusterConfig"
    owner: Doc
    name: str
    spec: dict[str, Any]


@dataclass(frozen=True)
class PodRef:
    """A pod template KubeRay makes pods from, with the labels those pods get."""

    where: str  # "RayCluster/llm-lifecycle spec.workerGroupSpecs[0] (gpu)"
    template: dict[str, Any]
    labels: dict[str, str]
    group: dict[str, Any] | None  # the head or worker group; None: the RayJob's submitter
    cluster: RayClusterRef | None


def ray_clusters(docs: list[Doc]) -> list[RayClusterRef]:
    """The cluster specs of RayCluster, RayService and RayJob (rayClusterSpec) manifests.
    KubeRay names a RayService's or RayJob's cluster `<name>-<5 random chars>`; the name
    used here has a `?` for them, which no label selector can match, as none can know it."""
    out = []
    for doc in docs:
        name, spec = doc.get("metadata", {}).get("name", ""), doc.get("spec", {})
        if doc.get("kind") == "RayCluster":
            out.append(RayClusterRef(f"{name_of(doc)} spec", doc, name, spec))
        elif doc.get("kind") == "RayService" and "rayClusterConfig" in spec:
            where = f"{name_of(doc)} spec.rayClusterConfig"
            out.append(RayClusterRef(where, doc, f"{name}-?????", spec["rayClusterConfig"]))
        elif doc.get("kind") == "RayJob" and "rayClusterSpec" in spec:
            where = f"{name_of(doc)} spec.rayClusterSpec"
            out.append(RayClusterRef(where, doc, f"{name}-?????", spec["rayClusterSpec"]))
    return out


def ray_pod_labels(
    template: dict[str, Any], group: dict[str, Any], cluster: str, head: bool
) -> dict[str, str]:
    """The labels KubeRay gives a Ray pod: the template's and the group's `labels`, then
    its own (pod.go labelPod: ray.io/cluster, node-type and group always win)."""
    own = {
        "ray.io/is-ray-node": "yes",
        "ray.io/cluster": cluster,
        "ray.io/node-type": "head" if head else "worker",
        "ray.io/group": "headgroup" if head else group.get("groupName", ""),
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    user = {**template.get("metadata", {}).get("labels", {}), **group.get("labels", {})}
    return {**own, **{k: v for k, v in user.items() if k not in FIXED_RAY_LABELS}}


def pods(docs: list[Doc]) -> list[PodRef]:
    """Every pod template in the manifests: each Ray cluster's head and worker groups, and each
    K8sJobMode RayJob's submitter (KubeRay's default one when the RayJob names none)."""
    out = []
    for c in ray_clusters(docs):
        head = c.spec.get("headGroupSpec", {})
        t = head.get("template", {})
        out.append(
            PodRef(f"{c.where}.headGroupSpec", t, ray_pod_labels(t, head, c.name, True), head, c)
        )
        for i, g in enumerate(c.spec.get("workerGroupSpecs", [])):
            t = g.get("template", {})
            where = f"{c.where}.workerGroupSpecs[{i}] ({g.get('groupName')})"
            out.append(PodRef(where, t, ray_pod_labels(t, g, c.name, False), g, c))
    for doc in docs:
        spec = doc.get("spec", {})
        if doc.get("kind") != "RayJob" or spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
            continue
        t = spec.get("submitterPodTemplate") or {
            "spec": {"containers": [{"name": "ray-job-submitter"}]}
        }
        labels = {
            **t.get("metadata", {}).get("labels", {}),
            "ray.io/originated-from-cr-name": doc["metadata"]["name"],
            "ray.io/originated-from-crd": "RayJob",
            "app.kubernetes.io/created-by": "kuberay-operator",
        }
        out.append(PodRef(f"{name_of(doc)} spec.submitterPodTemplate", t, labels, None, None))
    return out


def containers(pod: PodRef) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, container) for a pod's containers and init containers."""
    spec = pod.template.get("spec", {})
    for field in ("containers", "initContainers"):
        for i, c in enumerate(spec.get(field, [])):
            yield f"{pod.where} {field}[{i}] ({c.get('name')})", c


def ray_container(pod: PodRef) -> dict[str, Any]:
    """The Ray container: KubeRay's RayContainerIndex is 0."""
    return pod.template.get("spec", {}).get("containers", [{}])[0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{name: env entry} of a container."""
    return {e["name"]: e for e in container.get("env", []) if "name" in e}


def from_secret(entry: dict[str, Any] | None) -> bool:
    """Whether an env entry takes its value from a Secret (and has no literal value)."""
    return bool(entry) and "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {})


def selected_cluster(job: Doc, docs: list[Doc]) -> RayClusterRef | None:
    """The RayCluster a RayJob's clusterSelector names, if it is in `docs`."""
    want = job.get("spec", {}).get("clusterSelector", {}).get("ray.io/cluster")
    return next(
        (c for c in ray_clusters(docs) if c.owner.get("kind") == "RayCluster" and c.name == want),
        None,
    )


def job_clusters(docs: list[Doc]) -> list[RayClusterRef]:
    """The clusters RayJobs run on (the chain: driver on the head, Ray Train on the workers)."""
    out = []
    for job in (d for d in docs if d.get("kind") == "RayJob"):
        if "rayClusterSpec" in job.get("spec", {}):
            out += ray_clusters([job])
        elif (c := selected_cluster(job, docs)) is not None:
            out.append(c)
    return out


# ------------------------------------------------------------------------------------------
# (a) Serve replicas find the model
# ------------------------------------------------------------------------------------------


def quantity(value: Any) -> float:
    """A Kubernetes quantity as a number of units: 8 -> 8.0, "500m" -> 0.5, "2k" -> 2000.0."""
    s = str(value).strip()
    suffixes = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    for suffix, scale in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * scale
    return float(s)


def ray_start_resources(value: str) -> dict[str, float]:
    """rayStartParams.resources as KubeRay takes it: '"{\\"gpu_node\\": 1}"' (shell-quoted
    JSON, the form KubeRay's docs use) or plain JSON."""
    s = value.strip()
    if len(s) >= 2 and s[0] == s[-1] == '"':
        s = s[1:-1].replace('\\"', '"')
    return {k: float(v) for k, v in json.loads(s).items()}


def pod_resources(pod: PodRef) -> dict[str, float]:
    """The Ray resources a pod's node offers: CPU and GPU from rayStartParams or the Ray
    container's limits (KubeRay's order), custom ones from rayStartParams.resources and the
    group's `resources`. CPU unknown: Ray takes the machine's, counted as unbounded here."""
    group = pod.group or {}
    params = group.get("rayStartParams", {})
    limits = ray_container(pod).get("resources", {})
    limits = {**limits.get("requests", {}), **limits.get("limits", {})}
    out = {
        "CPU": quantity(params.get("num-cpus", limits.get("cpu", math.inf))),
        "GPU": quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }
    if "resources" in params:
        out.update(ray_start_resources(params["resources"]))
    out.update({k: quantity(v) for k, v in group.get("resources", {}).items()})
    return out


def can_host(pod: PodRef, actor_options: dict[str, Any]) -> bool:
    """Whether a Serve replica with `actor_options` (ray_actor_options) fits on the pod's node."""
    need = {
        "CPU": float(actor_options.get("num_cpus", 0) or 0),
        "GPU": float(actor_options.get("num_gpus", 0) or 0),
        **{k: float(v) for k, v in actor_options.get("resources", {}).items()},
    }
    have = pod_resources(pod)
    return all(have.get(k, 0.0) >= v for k, v in need.items() if v > 0)


def mounts_path(pod: PodRef, path: str) -> bool:
    """Whether the pod's Ray container mounts one of the pod's volumes at `path` or a parent."""
    volumes = {v.get("name") for v in pod.template.get("spec", {}).get("volumes", [])}
    return any(
        PurePosixPath(path).is_relative_to(m.get("mountPath", "/nowhere"))
        and m.get("name") in volumes
        for m in ray_container(pod).get("volumeMounts", [])
    )


def serve_mount_errors(docs: list[Doc]) -> list[str]:
    """Every pod of a RayService on which a replica of one of its apps can run mounts the
    app's model dir (runtime_env LIFECYCLE_SERVE_MODEL_DIR, or the app's args.model_dir)."""
    errors = []
    all_pods = pods(docs)
    for svc in (d for d in docs if d.get("kind") == "RayService"):
        config = yaml.safe_load(svc.get("spec", {}).get("serveConfigV2", "")) or {}
        mine = [p for p in all_pods if p.cluster is not None and p.cluster.owner is svc]
        for app in config.get("applications", []):
            env = app.get("runtime_env", {}).get("env_vars", {})
            model_dir = (app.get("args") or {}).get("model_dir") or env.get(
                "LIFECYCLE_SERVE_MODEL_DIR"
            )
            where = f"{name_of(svc)} app {app.get('name')!r}"
            if not model_dir:
                errors.append(
                    f"{where}: no model dir (LIFECYCLE_SERVE_MODEL_DIR or args.model_dir)"
                )
                continue
            for dep in app.get("deployments") or [{"name": "(every deployment)"}]:
                hosts = [p for p in mine if can_host(p, dep.get("ray_actor_options", {}))]
                if not hosts:
                    errors.append(f"{where}: no group can run a {dep.get('name')} replica")
                errors += [
                    f"{p.where}: can run {dep.get('name')} replicas but mounts no volume at "
                    f"{model_dir} or a parent of it"
                    for p in hosts
                    if not mounts_path(p, model_dir)
                ]
    return errors


def api_key_errors(docs: list[Doc]) -> list[str]:
    """$LIFECYCLE_API_KEY, from a Secret, wherever a Serve app on 0.0.0.0 is built: every pod
    of a RayService (Serve builds the app from its import path in a zero-CPU task that may run
    on any node; the key is read there) and the head of the clusters RayJobs run the chain on
    (the deploy stage builds it in the driver)."""
    chain = {c.where for c in job_clusters(docs)}
    want = [
        p
        for p in pods(docs)
        if p.cluster is not None
        and (
            p.cluster.owner.get("kind") == "RayService"
            or (p.cluster.where in chain and p.group is p.cluster.spec.get("headGroupSpec"))
        )
    ]
    return [
        f"{p.where}: no LIFECYCLE_API_KEY from a Secret (a Serve app built here would serve "
        "without auth, or refuse to start)"
        for p in want
        if not from_secret(env_of(ray_container(p)).get("LIFECYCLE_API_KEY"))
    ]


# ------------------------------------------------------------------------------------------
# (b) Ray token auth, (c) securityContext, (d) NetworkPolicy
# ------------------------------------------------------------------------------------------


def auth_errors(docs: list[Doc]) -> list[str]:
    """Token auth on every Ray cluster through KubeRay's authOptions; no hand-written
    RAY_AUTH_MODE/RAY_AUTH_TOKEN (KubeRay sets them only where absent, so a hand-written one
    would win); a RayJob's clusterSelector names a cluster in the manifests."""
    errors = []
    for c in ray_clusters(docs):
        auth = c.spec.get("authOptions") or {}
        if auth.get("mode") != "token":
            errors.append(f"{c.where}.authOptions: mode is {auth.get('mode')!r}, not 'token'")
        if auth.get("enableK8sTokenAuth") and c.owner.get("kind") != "RayCluster":
            errors.append(
                f"{c.where}.authOptions: enableK8sTokenAuth is RayCluster-only in KubeRay v1.7.0"
            )
    for pod in pods(docs):
        for where, c in containers(pod):
            errors += [
                f"{where}: sets {n} by hand"
                for n in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
                if n in env_of(c)
            ]
    for job in (d for d in docs if d.get("kind") == "RayJob"):
        if "clusterSelector" in job.get("spec", {}) and selected_cluster(job, docs) is None:
            errors.append(
                f"{name_of(job)}: spec.clusterSelector names no RayCluster of these manifests"
            )
    return errors


def pod_security_errors(ctx: dict[str, Any] | None, where: str) -> list[str]:
    """A pod securityContext: non-root with a non-zero uid and fsGroup, RuntimeDefault seccomp."""
    ctx = ctx or {}
    errors = []
    if ctx.get("runAsNonRoot") is not True:
        errors.append(f"{where}: runAsNonRoot is not true")
    for key in ("runAsUser", "fsGroup"):
        if not (isinstance(ctx.get(key), int) and ctx[key] > 0):
            errors.append(f"{where}: {key} is {ctx.get(key)!r}, not a non-zero id")
    if (ctx.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        errors.append(f"{where}: no RuntimeDefault seccompProfile")
    return errors


def container_security_errors(ctx: dict[str, Any] | None, where: str) -> list[str]:
    """A container securityContext: no privilege escalation, every capability dropped, nothing
    privileged or root."""
    ctx = ctx or {}
    errors = []
    if ctx.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{where}: allowPrivilegeEscalation is not false")
    caps = ctx.get("capabilities") or {}
    if "ALL" not in caps.get("drop", []):
        errors.append(f"{where}: capabilities do not drop ALL")
    if caps.get("add"):
        errors.append(f"{where}: adds capabilities {caps['add']}")
    if ctx.get("privileged") or ctx.get("runAsUser") == 0 or ctx.get("runAsNonRoot") is False:
        errors.append(f"{where}: privileged or root")
    return errors


def security_context_errors(docs: list[Doc]) -> list[str]:
    """Every pod (Ray pods, RayJob submitters) and every container, the in-tree autoscaler's
    included, has the restricted securityContext."""
    errors = []
    for pod in pods(docs):
        ctx = pod.template.get("spec", {}).get("securityContext")
        errors += pod_security_errors(ctx, f"{pod.where} securityContext")
        for where, c in containers(pod):
            errors += container_security_errors(
                c.get("securityContext"), f"{where} securityContext"
            )
    for c in ray_clusters(docs):
        if c.spec.get("enableInTreeAutoscaling"):
            ctx = (c.spec.get("autoscalerOptions") or {}).get("securityContext")
            errors += container_security_errors(ctx, f"{c.where}.autoscalerOptions.securityContext")
    return errors


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against `labels`."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _ingress_policies(docs: list[Doc]) -> list[Doc]:
    """The NetworkPolicies that restrict ingress (no policyTypes: Ingress)."""
    return [
        d
        for d in docs
        if d.get("kind") == "NetworkPolicy"
        and "Ingress" in (d.get("spec", {}).get("policyTypes") or ["Ingress"])
    ]


def network_policy_errors(docs: list[Doc]) -> list[str]:
    """Every pod is selected by an ingress NetworkPolicy; a Ray pod's policies let the pods of
    its own cluster in on every port (Ray needs them) and do not let another cluster's pods
    in that way; no rule is open to every source."""
    errors = []
    policies = _ingress_policies(docs)
    all_pods = pods(docs)
    for policy in policies:
        for i, rule in enumerate(policy.get("spec", {}).get("ingress") or []):
            where = f"{name_of(policy)} spec.ingress[{i}]"
            peers = rule.get("from") or []
            if not peers:
                errors.append(f"{where}: open to every source")
            for peer in peers:
                anywhere = (peer.get("ipBlock") or {}).get("cidr") in ("0.0.0.0/0", "::/0")
                if anywhere or (peer.get("namespaceSelector") == {} and "podSelector" not in peer):
                    errors.append(f"{where}: a peer open to every namespace or address")
    for pod in all_pods:
        mine = [p for p in policies if selector_matches(p["spec"].get("podSelector"), pod.labels)]
        if not mine:
            errors.append(f"{pod.where}: no NetworkPolicy selects its pods (labels {pod.labels})")
            continue
        if pod.cluster is None:
            continue
        mates = [q for q in all_pods if q.cluster is pod.cluster]
        others = [q for q in all_pods if q.cluster is not None and q.cluster is not pod.cluster]
        open_to_mates = open_to_others = False
        for p in mine:
            for rule in p["spec"].get("ingress") or []:
                if rule.get("ports"):
                    continue
                for peer in rule.get("from") or []:
                    if "namespaceSelector" in peer or "podSelector" not in peer:
                        continue
                    sel = peer["podSelector"]
                    open_to_mates |= all(selector_matches(sel, q.labels) for q in mates)
                    open_to_others |= any(selector_matches(sel, q.labels) for q in others)
        if not open_to_mates:
            errors.append(
                f"{pod.where}: its NetworkPolicies do not let its own Ray cluster in on every port"
            )
        if open_to_others:
            errors.append(
                f"{pod.where}: its NetworkPolicies let another Ray cluster in on every port"
            )
    return errors


# ------------------------------------------------------------------------------------------
# (e) MLflow, (f) secrets
# ------------------------------------------------------------------------------------------


def _command_lines(docs: list[Doc]) -> Iterator[tuple[str, str]]:
    """(where, text) of every entrypoint, command and args in the manifests."""
    for doc in docs:
        if "entrypoint" in doc.get("spec", {}):
            yield f"{name_of(doc)} spec.entrypoint", str(doc["spec"]["entrypoint"])
    for pod in pods(docs):
        for where, c in containers(pod):
            for field in ("command", "args"):
                for text in c.get(field, []):
                    yield f"{where} {field}", str(text)
    for c in ray_clusters(docs):
        opts = c.spec.get("autoscalerOptions") or {}
        for field in ("command", "args"):
            for text in opts.get(field, []):
                yield f"{c.where}.autoscalerOptions.{field}", str(text)


def mlflow_errors(docs: list[Doc]) -> list[str]:
    """No MLflow URI or tracking setting on a command line; every pod of a cluster that runs
    the chain (a RayJob's) has MLFLOW_TRACKING_URI over https without credentials in it, and
    MLFLOW_TRACKING_USERNAME/PASSWORD from a Secret; any MLFLOW_TRACKING_URI is https."""
    errors = [
        f"{where}: MLflow on the command line ({text!r}): use $MLFLOW_TRACKING_URI"
        for where, text in _command_lines(docs)
        if re.search(r"mlflow|tracking_uri", text, re.I)
    ]
    chain = {c.where for c in job_clusters(docs)}
    for pod in pods(docs):
        for where, c in containers(pod):
            uri = env_of(c).get("MLFLOW_TRACKING_URI")
            if uri is not None and not str(uri.get("value", "")).startswith("https://"):
                errors.append(f"{where}: MLFLOW_TRACKING_URI {uri.get('value')!r} is not https://")
        if pod.cluster is None or pod.cluster.where not in chain:
            continue
        env = env_of(ray_container(pod))
        if "MLFLOW_TRACKING_URI" not in env:
            errors.append(f"{pod.where}: runs the chain but has no MLFLOW_TRACKING_URI")
        elif "@" in str(env["MLFLOW_TRACKING_URI"].get("value", "")):
            errors.append(f"{pod.where}: MLFLOW_TRACKING_URI carries credentials")
        errors += [
            f"{pod.where}: {n} is not taken from a Secret"
            for n in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
            if not from_secret(env.get(n))
        ]
    return errors


def is_secret_name(name: str) -> bool:
    """Whether an env var's or a setting's name says its value is a secret (not a path to
    one)."""
    return bool(SECRET_NAME.search(name)) and not name.upper().endswith(POINTER_SUFFIXES)


def has_secret_assignment(text: str) -> bool:
    """Whether a command line sets something secret-named to a literal value."""
    return any(is_secret_name(name) for name in ASSIGNMENT.findall(text))


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, _join(path, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


def secret_value_errors(docs: list[Doc]) -> list[str]:
    """No secret in the manifests: secret-named env vars come from Secrets (containers, the
    autoscaler, Serve's and RayJob's runtime_env), no Secret objects with data, no
    password in a URI, no `name=value` secret on a command line."""
    errors = []
    for pod in pods(docs):
        for where, c in containers(pod):
            errors += [
                f"{where} env {n}: a literal value"
                for n, e in env_of(c).items()
                if is_secret_name(n) and "value" in e
            ]
    for c in ray_clusters(docs):
        env = env_of(c.spec.get("autoscalerOptions") or {})
        errors += [
            f"{c.where}.autoscalerOptions env {n}: a literal value"
            for n, e in env.items()
            if is_secret_name(n) and "value" in e
        ]
    for doc in docs:
        spec = doc.get("spec", {})
        runtime_envs = []
        if doc.get("kind") == "RayService":
            apps = (yaml.safe_load(spec.get("serveConfigV2", "")) or {}).get("applications", [])
            runtime_envs += [
                (f"app {a.get('name')!r} runtime_env", a.get("runtime_env") or {}) for a in apps
            ]
        if doc.get("kind") == "RayJob" and spec.get("runtimeEnvYAML"):
            runtime_envs.append(
                ("spec.runtimeEnvYAML", yaml.safe_load(spec["runtimeEnvYAML"]) or {})
            )
        for where, renv in runtime_envs:
            errors += [
                f"{name_of(doc)} {where}: {n} (stored in the custom resource in plain text)"
                for n in (renv.get("env_vars") or {})
                if is_secret_name(n)
            ]
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            errors.append(f"{name_of(doc)}: a Secret with its data in the manifests")
        for path, text in _strings(doc, ""):
            if URI_WITH_PASSWORD.search(text):
                errors.append(f"{name_of(doc)} {path}: a URI with a password")
    errors += [
        f"{where}: a secret on the command line ({text!r})"
        for where, text in _command_lines(docs)
        if has_secret_assignment(text)
    ]
    return errors


# ------------------------------------------------------------------------------------------
# (g) The `ray up` launcher file
# ------------------------------------------------------------------------------------------


def launcher_errors(config: dict[str, Any]) -> list[str]:
    """ray_cluster/cluster.yaml: Ray's own launcher schema (what `ray up` checks before it
    touches the cloud); the token file distributed with file_mounts and every `ray start`
    in token mode; the dashboard on loopback; the env file the start commands read is
    file-mounted (credentials are not in the file); no secret on a command line."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    errors = []
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # jsonschema.ValidationError, ValueError: whatever `ray up` would raise
        errors.append(f"cluster.yaml: Ray's launcher rejects it: {str(e).splitlines()[0]}")
    mounts = config.get("file_mounts") or {}
    if "~/.ray/auth_token" not in mounts:
        errors.append("cluster.yaml file_mounts: ~/.ray/auth_token is not distributed to the nodes")
    commands = [
        (f"{key}[{i}]", cmd)
        for key in (
            "initialization_commands",
            "setup_commands",
            "head_setup_commands",
            "worker_setup_commands",
            "head_start_ray_commands",
            "worker_start_ray_commands",
        )
        for i, cmd in enumerate(config.get(key) or [])
    ]
    for where, cmd in commands:
        if re.search(r"\bray start\b", cmd) and not re.search(
            r"\bRAY_AUTH_MODE=token\b.*\bray start\b", cmd
        ):
            errors.append(f"cluster.yaml {where}: `ray start` without RAY_AUTH_MODE=token")
        for host in re.findall(r"--dashboard-host[= ](\S+)", cmd):
            if host not in ("127.0.0.1", "localhost"):
                errors.append(f"cluster.yaml {where}: the dashboard listens on {host}")
        for sourced in re.findall(r"(?:^|&&|;)\s*(?:\.|source)\s+(\S+)", cmd):
            if sourced not in mounts:
                errors.append(
                    f"cluster.yaml {where}: sources {sourced}, which file_mounts does not bring"
                )
        if has_secret_assignment(cmd) or URI_WITH_PASSWORD.search(cmd):
            errors.append(f"cluster.yaml {where}: a secret on the command line")
        if re.search(r"MLFLOW_TRACKING_(USERNAME|PASSWORD)\s*=", cmd):
            errors.append(f"cluster.yaml {where}: MLflow credentials in the file")
    start = [
        cmd
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for cmd in config.get(key) or []
        if "ray start" in cmd
    ]
    if not all(re.search(r"(?:^|&&|;)\s*(?:\.|source)\s+\S+", cmd) for cmd in start):
        errors.append(
            "cluster.yaml: a `ray start` that does not read the env file with MLflow's settings"
        )
    return errors


def main() -> None:
    """Prints every check's errors for the repository's files."""
    docs, schemas = load_docs(), load_schemas()
    errors = [e for d in docs for e in manifest_errors(d, schemas)]
    for check in (
        serve_mount_errors,
        api_key_errors,
        auth_errors,
        security_context_errors,
        network_policy_errors,
        mlflow_errors,
        secret_value_errors,
    ):
        errors += check(docs)
    errors += launcher_errors(yaml.safe_load(LAUNCHER_FILE.read_text()))
    print("\n".join(errors) or "no errors")


if __name__ == "__main__":
    main()
