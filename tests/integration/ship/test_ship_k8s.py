"""The Kubernetes overlays, rendered by kustomize: the pods probe the app's real
routes, their timings add up, they run locked down with writable caches, and the
pool, route, objectives, disruption budget and autoscaler all point at them."""

from __future__ import annotations

import os
import re

import pytest
import yaml
from shipfiles import (
    K8S_DIR,
    dockerfile_instructions,
    duration_seconds,
    k8s_all,
    k8s_documents,
    k8s_one,
    k8s_overlays,
    key_values,
)

FIRST_START_SECONDS = 40 * 60  # ~20 GB download at 100 Mbit/s + load + compile (SERVE.md)
EXIT_MARGIN_SECONDS = 10  # engine shutdown + process exit after the drain
ADAPTER_VALUES = K8S_DIR / "prometheus-adapter" / "values.yaml"


def test_both_overlays_exist() -> None:
    assert k8s_overlays() == ["interactive", "long-context"]


@pytest.fixture(scope="module", params=k8s_overlays())
def overlay(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def documents(overlay):
    return k8s_documents(overlay)


@pytest.fixture(scope="module")
def deployment(documents):
    return k8s_one(documents, "Deployment")


@pytest.fixture(scope="module")
def pod(deployment):
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def pod_labels(deployment):
    return deployment["spec"]["template"]["metadata"]["labels"]


@pytest.fixture(scope="module")
def container(pod):
    (container,) = pod["containers"]
    return container


@pytest.fixture()
def settings(container, monkeypatch):
    """The settings the container's environment gives, through the real loader."""
    from lnarize_serve.settings import load_settings

    for key in [key for key in os.environ if key.startswith("LNARIZE_")]:
        monkeypatch.delenv(key)
    for key, value in container_env(container).items():
        monkeypatch.setenv(key, value)
    return load_settings()


def container_env(container) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def named_port(container, port) -> int:
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return port


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


# Probes and timings ------------------------------------------------------------------


@pytest.mark.vllm  # app_route_paths: the app mounts vLLM's OpenAI routers
def test_probes_and_scrape_path_hit_the_apps_routes(deployment, container, app_route_paths) -> None:
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] in app_route_paths
    assert container["startupProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[kind]["httpGet"]["path"] in app_route_paths, kind


def test_probes_service_and_pool_use_the_port_the_settings_listen_on(documents, container, settings) -> None:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert named_port(container, container[kind]["httpGet"]["port"]) == settings.port
    (service_port,) = k8s_one(documents, "Service")["spec"]["ports"]
    assert named_port(container, service_port["targetPort"]) == settings.port
    pool = k8s_one(documents, "InferencePool")
    assert [port["number"] for port in pool["spec"]["targetPorts"]] == [settings.port]
    annotations = k8s_one(documents, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.port)


def test_startup_probe_allows_a_first_download_and_compile(container) -> None:
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= FIRST_START_SECONDS


def test_grace_period_covers_prestop_plus_the_configured_drain(pod, container, settings) -> None:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop > 0
    # drain_timeout read through the real loader, as the server reads it
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + settings.drain_timeout + EXIT_MARGIN_SECONDS


def test_every_lnarize_variable_is_a_valid_setting_and_selects_the_overlays_profile(
    overlay, container, settings
) -> None:
    from lnarize_serve.settings import unknown_env_vars

    assert not unknown_env_vars(container_env(container))
    assert settings.profile == overlay


# Pod hardening -----------------------------------------------------------------------


def test_runs_non_root_with_runtime_default_seccomp_and_no_privileges(pod, container) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    assert "privileged" not in security or security["privileged"] is False


def service_link_variables(service: dict) -> dict[str, str]:
    """The variables Kubernetes injects for a Service when service links are on (docker-links style)."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    variables = {f"{prefix}_SERVICE_HOST": "10.0.0.1"}
    for port in service["spec"]["ports"]:
        variables[f"{prefix}_SERVICE_PORT"] = str(port["port"])
        variables[f"{prefix}_SERVICE_PORT_{port['name'].upper()}"] = str(port["port"])
        variables[f"{prefix}_PORT"] = f"tcp://10.0.0.1:{port['port']}"
        tcp = f"{prefix}_PORT_{port['port']}_TCP"
        variables.update({tcp: f"tcp://10.0.0.1:{port['port']}", f"{tcp}_PROTO": "tcp",
                          f"{tcp}_PORT": str(port["port"]), f"{tcp}_ADDR": "10.0.0.1"})
    return variables


def test_no_service_link_variables_and_no_api_token(documents, pod) -> None:
    from lnarize_serve.settings import ENV_PREFIX

    # The Service's own links would be LNARIZE_SERVE_* variables, inside the
    # settings' namespace: the pod must not get them.
    links = service_link_variables(k8s_one(documents, "Service"))
    assert all(name.startswith(ENV_PREFIX) for name in links), links
    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False


def test_root_filesystem_is_read_only_and_every_cache_the_image_names_is_a_volume(pod, container) -> None:
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    image_env: dict[str, str] = {}
    for instruction in dockerfile_instructions():
        if instruction.keyword == "ENV":
            image_env.update(key_values(instruction.arguments))
    writable = {mount["mountPath"] for mount in container["volumeMounts"] if not mount.get("readOnly")}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes
    needed = [image_env[name] for name in ("HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "HOME")]
    needed += ["/tmp", "/dev/shm"]
    for path in needed:
        assert any(path == root or path.startswith(root + "/") for root in writable), path


def test_shm_is_a_memory_volume(pod, container) -> None:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"


def test_model_cache_is_one_volume_every_replica_mounts(documents, pod, container) -> None:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/cache/huggingface"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = k8s_one(documents, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_an_init_process_reaps_children_as_compose_init_does(pod) -> None:
    assert pod["shareProcessNamespace"] is True


def test_one_gpu_per_pod_and_token_from_a_secret(container) -> None:
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == 1
    (token,) = [item for item in container["env"] if item["name"] == "HF_TOKEN"]
    assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"]


def test_updates_never_need_a_spare_gpu(deployment) -> None:
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxSurge"] == 0


# Selection: service, pool, budget, route, objectives, autoscaler ----------------------


def test_every_selector_selects_the_deployments_pods_and_only_this_overlays(documents, overlay, pod_labels) -> None:
    deployment = k8s_one(documents, "Deployment")
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": k8s_one(documents, "Service")["spec"]["selector"],
        "PodDisruptionBudget": k8s_one(documents, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "InferencePool": k8s_one(documents, "InferencePool")["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selects(selector, pod_labels), kind
        # the other overlay's pods (same base labels, other instance) are not selected
        other = dict(pod_labels, **{"app.kubernetes.io/instance": "other"})
        assert not selects(selector, other), kind
        assert selector.get("app.kubernetes.io/instance") == overlay, kind


def test_disruption_budget_lets_one_pod_go_at_a_time(documents) -> None:
    spec = k8s_one(documents, "PodDisruptionBudget")["spec"]
    assert spec["maxUnavailable"] == 1 and "minAvailable" not in spec


def test_llm_d_labels_name_the_served_model(pod_labels, settings) -> None:
    assert pod_labels["llm-d.ai/inferenceServing"] == "true"
    assert pod_labels["llm-d.ai/role"] == "prefill-decode"  # no prefill/decode disaggregation
    assert pod_labels["llm-d.ai/model"] == settings.served_model_name


def test_pool_names_its_endpoint_picker_after_itself(documents) -> None:
    pool = k8s_one(documents, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    # llm-d's router chart installed with the pool's name as release names its Service "<release>-epp".
    assert ref["name"] == pool["metadata"]["name"] + "-epp"
    assert ref["port"]["number"] == 9002


def test_endpoint_picker_chart_values_describe_the_same_pool(overlay, documents) -> None:
    """llm-d's router chart creates the pool from these values; it must equal ours."""
    values = yaml.safe_load((K8S_DIR / "overlays" / overlay / "endpoint-picker-values.yaml").read_text())["router"]
    pool = k8s_one(documents, "InferencePool")
    spec = pool["spec"]
    release = pool["metadata"]["name"]  # the chart names the pool after the release...
    assert len(release) <= 40  # ...and its Service "<release, cut to 40>-epp"
    assert spec["endpointPickerRef"]["name"] == f"{release}-epp"
    assert values["modelServers"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert values["modelServers"]["targetPorts"] == spec["targetPorts"]
    assert values["modelServers"]["protocol"] == spec["appProtocol"] == "http"
    assert values["modelServers"]["type"] == "vllm"
    assert values["inferencePool"] == {"create": True, "failureMode": spec["endpointPickerRef"]["failureMode"]}
    assert values["epp"]["image"]["tag"] == "v0.10.0"  # the release the vendored InferenceObjective CRD is from


def test_route_and_objectives_point_at_this_pool(documents) -> None:
    pool_name = k8s_one(documents, "InferencePool")["metadata"]["name"]
    route = k8s_one(documents, "HTTPRoute")
    for rule in route["spec"]["rules"]:
        assert rule["backendRefs"] == [
            {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool_name}
        ]
        assert all(match["path"]["value"] == "/v1/" for match in rule["matches"])
    objectives = k8s_all(documents, "InferenceObjective")
    assert {o["spec"]["priority"] for o in objectives} == {10, -10}
    for objective in objectives:
        assert objective["spec"]["poolRef"]["name"] == pool_name


def test_route_timeout_outlasts_the_drain(documents, settings) -> None:
    (rule, *_) = k8s_one(documents, "HTTPRoute")["spec"]["rules"]
    assert duration_seconds(rule["timeouts"]["request"]) >= settings.drain_timeout


def test_long_context_route_matches_its_served_model_name(documents, overlay, settings) -> None:
    matches = [match for rule in k8s_one(documents, "HTTPRoute")["spec"]["rules"] for match in rule["matches"]]
    headers = [header for match in matches for header in match.get("headers", [])]
    if overlay == "interactive":
        assert headers == []  # the default route for /v1/
    else:
        assert headers == [{"type": "Exact", "name": "X-Gateway-Model-Name", "value": settings.served_model_name}]
        assert settings.served_model_name != "qwen3.6-27b"


def test_autoscaler_scales_this_deployment_on_the_adapters_queue_metric(documents, deployment) -> None:
    assert "replicas" not in deployment["spec"]  # would reset the autoscaler's count on every apply
    hpa = k8s_one(documents, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert hpa["minReplicas"] >= 1 and hpa["maxReplicas"] > hpa["minReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    (rule,) = adapter_rules()
    assert metric["pods"]["metric"]["name"] == adapter_metric_name(rule)
    assert adapter_source_series(rule) == "vllm:num_requests_waiting"


def test_adapter_rule_maps_pods_and_namespaces() -> None:
    (rule,) = adapter_rules()
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def adapter_source_series(rule: dict) -> str:
    series = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{.*\}", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    return series


def adapter_metric_name(rule: dict) -> str:
    series = adapter_source_series(rule)
    return re.sub(rule["name"]["matches"], rule["name"]["as"], series)

