"""Every rendered manifest validates strictly: built-in kinds against the
Kubernetes API schemas (kubernetes-validate, strict: no unknown field), the
inference extension's and Gateway API's kinds against their vendored, pinned
CRDs (structural schema as strict JSON Schema, then the CRDs' CEL rules)."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
from cel_rules import apply_defaults, evaluate_rules
from crd_schemas import load_crds, pinned_sources, validate_custom_resource, vendored_file_hashes
from shipfiles import k8s_all, k8s_documents, k8s_one, k8s_overlays

# The oldest Kubernetes the manifests target (InferencePool v1 needs CEL list
# macros, GA since 1.25; autoscaling/v2 and policy/v1 long before) and the newest
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
CUSTOM_KINDS = {
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("llm-d.ai/v1alpha2", "InferenceObjective"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}


@pytest.fixture(scope="module")
def crds():
    return load_crds()


@pytest.fixture(scope="module", params=k8s_overlays())
def documents(request):
    return k8s_documents(request.param)


def test_vendored_crds_are_the_pinned_upstream_files() -> None:
    sources = pinned_sources()
    assert set(sources) == set(vendored_file_hashes())
    for name, digest in vendored_file_hashes().items():
        assert sources[name]["sha256"] == digest, name
        assert len(sources[name]["commit"]) == 40 and sources[name]["tag"].startswith("v"), name


def test_the_vendored_crds_serve_the_versions_the_manifests_use(crds) -> None:
    assert CUSTOM_KINDS <= set(crds)


def test_every_document_validates_strictly(documents, crds) -> None:
    kinds = set()
    for document in documents:
        key = (document["apiVersion"], document["kind"])
        kinds.add(key)
        if key in crds:
            validate_custom_resource(document, crds)
            crd = crds[key]
            failures, evaluated = evaluate_rules(crd.open_api, apply_defaults(crd.open_api, document))
            assert not failures, failures
        else:
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(document, version, strict=True)
    assert CUSTOM_KINDS <= kinds
    assert {("apps/v1", "Deployment"), ("policy/v1", "PodDisruptionBudget"),
            ("autoscaling/v2", "HorizontalPodAutoscaler"), ("v1", "Service"),
            ("v1", "PersistentVolumeClaim")} <= kinds


def test_the_crd_rules_run_on_the_pool_and_route(documents, crds) -> None:
    for kind in ("InferencePool", "HTTPRoute"):
        document = k8s_one(documents, kind)
        crd = crds[(document["apiVersion"], kind)]
        _, evaluated = evaluate_rules(crd.open_api, apply_defaults(crd.open_api, document))
        assert evaluated > 0, kind


# The validators reject what the API server would (so a pass above means something).


def test_an_unknown_field_in_a_custom_resource_is_rejected(crds) -> None:
    pool = copy.deepcopy(k8s_one(k8s_documents("interactive"), "InferencePool"))
    pool["spec"]["endpointPickerRef"]["failureMod"] = "FailOpen"
    with pytest.raises(jsonschema.ValidationError, match="failureMod"):
        validate_custom_resource(pool, crds)


def test_an_unknown_metadata_field_in_a_custom_resource_is_rejected(crds) -> None:
    objective = copy.deepcopy(k8s_all(k8s_documents("interactive"), "InferenceObjective")[0])
    objective["metadata"]["label"] = {"a": "b"}
    with pytest.raises(jsonschema.ValidationError, match="label"):
        validate_custom_resource(objective, crds)


def test_a_wrong_enum_value_in_a_custom_resource_is_rejected(crds) -> None:
    pool = copy.deepcopy(k8s_one(k8s_documents("interactive"), "InferencePool"))
    pool["spec"]["endpointPickerRef"]["failureMode"] = "Open"
    with pytest.raises(jsonschema.ValidationError):
        validate_custom_resource(pool, crds)


def test_a_cel_rule_violation_is_reported(crds) -> None:
    pool = copy.deepcopy(k8s_one(k8s_documents("interactive"), "InferencePool"))
    pool["spec"]["targetPorts"] = [{"number": 9000}, {"number": 9000}]
    validate_custom_resource(pool, crds)  # the structural schema allows it
    crd = crds[(pool["apiVersion"], "InferencePool")]
    failures, _ = evaluate_rules(crd.open_api, apply_defaults(crd.open_api, pool))
    assert [failure.message for failure in failures] == ["port number must be unique"]


def test_a_service_picker_without_port_breaks_a_rule_once_defaulted(crds) -> None:
    pool = copy.deepcopy(k8s_one(k8s_documents("interactive"), "InferencePool"))
    del pool["spec"]["endpointPickerRef"]["port"]
    crd = crds[(pool["apiVersion"], "InferencePool")]
    failures, _ = evaluate_rules(crd.open_api, apply_defaults(crd.open_api, pool))
    assert [f.path for f in failures] == ["/spec/endpointPickerRef"]


def test_an_unknown_field_in_a_builtin_kind_is_rejected() -> None:
    deployment = copy.deepcopy(k8s_one(k8s_documents("interactive"), "Deployment"))
    deployment["spec"]["template"]["spec"]["enableServiceLink"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
