"""Validate rendered manifests: Kubernetes kinds against the Kubernetes OpenAPI schemas
(kubernetes-validate), KEDA, Strimzi and prometheus-operator resources against their published CRDs
(vendored in deploy/crds/, see SOURCES.md), with a real JSON Schema validator."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

from abqueue.errors import AbqError

CRD_DIR = Path(__file__).resolve().parent / "crds"
K8S_VERSION = "1.30.0"


class ManifestError(AbqError, ValueError):
    pass


@cache
def _crd_schemas() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def validate_document(doc: dict) -> None:
    """Raises ManifestError naming the resource and the first problem."""
    try:
        import jsonschema
        import kubernetes_validate
    except ModuleNotFoundError as missing:
        raise ManifestError(
            f"validating manifests needs {missing.name}, from the deploy extra: pip install 'abqueue[deploy]'"
        ) from None

    key = (doc.get("apiVersion"), doc.get("kind"))
    name = f"{key[1]} {doc.get('metadata', {}).get('name')}"
    if key in _crd_schemas():
        errors = sorted(jsonschema.Draft7Validator(_crd_schemas()[key]).iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            raise ManifestError(f"{name}: {'/'.join(map(str, e.path)) or '(top)'}: {e.message}")
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(map(str, getattr(e, "path", []))) or "(top)"
        raise ManifestError(f"{name}: {path}: {e.message}") from None
    except kubernetes_validate.SchemaNotFoundError:
        raise ManifestError(f"{name}: no Kubernetes {K8S_VERSION} schema for {key[0]} {key[1]}") from None


def validate_files(files: dict[str, list[dict]]) -> int:
    n = 0
    for docs in files.values():
        for doc in docs:
            validate_document(doc)
            n += 1
    return n
