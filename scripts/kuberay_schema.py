"""Writes tests/k8s/kuberay-<ref>.json: the v1 schemas of KubeRay's RayCluster, RayJob and
RayService CRDs, pruned to what tests/unit/test_manifests.py checks our manifests against.

Regenerate from a KubeRay clone (bare or not) at a tag, or from the files of a work tree:

    git clone https://github.com/ray-project/kuberay ~/src/kuberay
    python scripts/kuberay_schema.py --repo ~/src/kuberay --ref v1.7.0   # git show v1.7.0:...
    python scripts/kuberay_schema.py --path ~/src/kuberay --ref v1.7.0   # the checked-out files

The CRDs are ~1 MB each, most of it descriptions and Kubernetes' own types. Kept: field names,
types, enums, `required`, min/max, int-or-string and preserve-unknown-fields markers. Dropped:
descriptions, `status`, CEL rules, patterns, defaults. Every embedded Kubernetes type (a pod
template, a Service, an EnvVar, a NetworkPolicy rule...) becomes {"x-k8s-model": "V1..."}: the
test checks those parts with the official `kubernetes` client's model of that name instead.
Where an embedded type sits is read from the Go types the CRDs are generated from
(ray-operator/apis/ray/v1/*_types.go), not from a hand-kept list; the script stops if a Go
struct and its schema disagree on field names, or a model is missing from the client.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = "ray-operator/config/crd/bases"
TYPES_DIR = "ray-operator/apis/ray/v1"
KINDS = {  # kind: (CRD file, Go types file)
    "RayCluster": ("ray.io_rayclusters.yaml", "raycluster_types.go"),
    "RayJob": ("ray.io_rayjobs.yaml", "rayjob_types.go"),
    "RayService": ("ray.io_rayservices.yaml", "rayservice_types.go"),
}
# Go packages whose object types the `kubernetes` client has models for, named V1<Type>.
K8S_PACKAGES = {"corev1", "networkingv1", "metav1"}
KEEP = (
    "type",
    "required",
    "enum",
    "minimum",
    "maximum",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
)

STRUCT_RE = re.compile(r"^type (\w+) struct \{\n(.*?)^\}", re.M | re.S)
FIELD_RE = re.compile(r'^\t(?:(\w+)\s+)?([\w.\[\]*]+)\s+`json:"([^"]*)"', re.M)


class SourceReader:
    """Reads repository files from a git dir at a ref, or from a work tree."""

    def __init__(self, repo: Path | None, path: Path | None, ref: str) -> None:
        self.repo, self.path, self.ref = repo, path, ref

    def read(self, rel: str) -> str:
        if self.path is not None:
            return (self.path / rel).read_text()
        cmd = ["git", "-C", str(self.repo), "show", f"{self.ref}:{rel}"]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def go_structs(sources: list[str]) -> dict[str, list[tuple[str, str]]]:
    """{struct name: [(json name, Go type)]} from Go source; an inlined struct's fields are
    spliced in (`json:",inline"`), `json:"-"` fields are skipped."""
    raw: dict[str, list[tuple[str | None, str, str]]] = {}
    for src in sources:
        for name, body in STRUCT_RE.findall(src):
            raw[name] = [(f, t, tag) for f, t, tag in FIELD_RE.findall(body)]

    def fields(name: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for _, gotype, tag in raw[name]:
            json_name, _, opts = tag.partition(",")
            if json_name == "-":
                continue
            if not json_name and "inline" in opts:
                if gotype in raw:
                    out += fields(gotype)
                continue  # metav1.TypeMeta: apiVersion and kind, taken from the schema
            out.append((json_name, gotype))
        return out

    return {name: fields(name) for name in raw}


def strip(node: dict[str, Any]) -> dict[str, Any]:
    """`node` with only the KEEP keys, recursively (no descriptions, patterns, CEL rules)."""
    out = {k: node[k] for k in KEEP if k in node}
    if "properties" in node:
        out["properties"] = {k: strip(v) for k, v in node["properties"].items()}
    if "items" in node:
        out["items"] = strip(node["items"])
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = strip(extra)
    elif extra is not None:
        out["additionalProperties"] = extra
    return out


def model_name(gotype: str) -> str:
    """The `kubernetes` client model for a Go type: corev1.PodTemplateSpec -> V1PodTemplateSpec."""
    import kubernetes.client

    name = "V1" + gotype.split(".")[1]
    if not hasattr(kubernetes.client, name):
        raise SystemExit(f"the kubernetes client has no model {name} (for {gotype})")
    return name


def prune(
    node: dict[str, Any], gotype: str, structs: dict[str, list[tuple[str, str]]], path: str
) -> dict[str, Any]:
    """`node` (a CRD schema node generated from Go type `gotype`) pruned: KubeRay's own
    structs recursed into, embedded Kubernetes object types replaced by a model marker."""
    t = gotype.lstrip("*")
    if t.startswith("[]"):
        out = {k: node[k] for k in KEEP if k in node}
        out["items"] = prune(node["items"], t[2:], structs, path + "[]")
        return out
    if t.startswith("map[string]"):
        out = {k: node[k] for k in KEEP if k in node}
        extra = node.get("additionalProperties")
        out["additionalProperties"] = (
            prune(extra, t[len("map[string]") :], structs, path + "{}")
            if isinstance(extra, dict)
            else extra
        )
        return out
    pkg = t.split(".")[0] if "." in t else ""
    if pkg in K8S_PACKAGES and node.get("type") == "object":
        return {"x-k8s-model": model_name(t)}
    if t not in structs:  # a string enum, a Quantity, a scalar
        return strip(node)
    fields = dict(structs[t])
    props = node.get("properties", {})
    if set(fields) != set(props):
        raise SystemExit(
            f"{path}: Go struct {t} has fields {sorted(set(fields) - set(props))} the schema "
            f"lacks, the schema {sorted(set(props) - set(fields))} the struct lacks"
        )
    out = {k: node[k] for k in KEEP if k in node}
    out["properties"] = {
        k: prune(props[k], fields[k], structs, f"{path}.{k}") for k in sorted(props)
    }
    return out


def model_gaps(node: dict[str, Any], model: str, path: str) -> list[str]:
    """Fields the CRD allows inside an embedded Kubernetes type that the `kubernetes` client's
    model lacks (a manifest using one would be reported as unknown by the test)."""
    import kubernetes.client

    cls = getattr(kubernetes.client, model)
    by_json = {j: cls.openapi_types[a] for a, j in cls.attribute_map.items()}
    gaps = []
    for key, sub in node.get("properties", {}).items():
        if key not in by_json:
            gaps.append(f"{path}.{key}")
            continue
        inner = re.sub(r"^(list\[|dict\(str, )", "", by_json[key]).rstrip("])")
        if hasattr(kubernetes.client, inner):
            sub = sub.get("items", sub.get("additionalProperties", sub))
            if isinstance(sub, dict):
                gaps += model_gaps(sub, inner, f"{path}.{key}")
    return gaps


def find_markers(full: dict[str, Any], pruned: dict[str, Any], path: str) -> list[str]:
    """model_gaps for every marker in `pruned`, `full` being the same node unpruned."""
    if "x-k8s-model" in pruned:
        return model_gaps(full, pruned["x-k8s-model"], path)
    gaps = []
    for k, sub in pruned.get("properties", {}).items():
        gaps += find_markers(full["properties"][k], sub, f"{path}.{k}")
    for key in ("items", "additionalProperties"):
        if isinstance(pruned.get(key), dict):
            gaps += find_markers(full[key], pruned[key], path + "[]")
    return gaps


def kind_schema(crd: dict[str, Any], structs: dict[str, list[tuple[str, str]]], kind: str):
    """The pruned v1 schema of one CRD, and the model gaps found in it."""
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    full = version["schema"]["openAPIV3Schema"]
    spec_type = dict(structs[kind])["spec"]
    props = full["properties"]
    schema = {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"type": "string", "enum": ["ray.io/v1"]},
            "kind": {"type": "string", "enum": [kind]},
            "metadata": {"x-k8s-model": "V1ObjectMeta"},
            "spec": prune(props["spec"], spec_type, structs, "spec"),
        },
    }
    return schema, find_markers(full, schema, "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", type=Path, help="a KubeRay clone (bare is fine), read at --ref")
    where.add_argument("--path", type=Path, help="a KubeRay work tree")
    parser.add_argument("--ref", default="v1.7.0", help="the tag (names the output file)")
    parser.add_argument("--out", type=Path, help="default: tests/k8s/kuberay-<ref>.json")
    args = parser.parse_args()

    import yaml

    reader = SourceReader(args.repo, args.path, args.ref)
    structs = go_structs([reader.read(f"{TYPES_DIR}/{go}") for _, go in KINDS.values()])
    kinds, gaps = {}, []
    for kind, (crd_file, _) in KINDS.items():
        crd = yaml.safe_load(reader.read(f"{CRD_DIR}/{crd_file}"))
        kinds[kind], found = kind_schema(crd, structs, kind)
        gaps += [f"{kind}{g}" for g in found]
    out = args.out or ROOT / "tests" / "k8s" / f"kuberay-{args.ref}.json"
    doc = {
        "source": f"ray-project/kuberay {args.ref} {CRD_DIR} (scripts/kuberay_schema.py)",
        "kinds": kinds,
    }
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    for g in gaps:
        print(f"warning: the CRD allows {g}, the kubernetes client's model does not")


if __name__ == "__main__":
    main()
