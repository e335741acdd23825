"""The Kubernetes example probes the app's real routes and its timings add up."""

from __future__ import annotations

import pytest
from shipfiles import k8s_documents, k8s_one

FIRST_START_SECONDS = 40 * 60  # ~20 GB download at 100 Mbit/s + load + compile (SERVE.md)
EXIT_MARGIN_SECONDS = 10  # engine shutdown + process exit after the drain


@pytest.fixture(scope="module")
def documents():
    return k8s_documents()


@pytest.fixture(scope="module")
def pod(documents):
    return k8s_one(documents, "Deployment")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod):
    (container,) = pod["containers"]
    return container


def container_env(container) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def probe_port(container, probe) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return port


def test_probes_hit_the_apps_routes(container, app_route_paths) -> None:
    assert container["startupProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[kind]["httpGet"]["path"] in app_route_paths, kind


def test_probes_and_service_use_the_port_the_settings_listen_on(documents, container) -> None:
    from lnarize_serve.settings import Settings

    port = int(container_env(container).get("LNARIZE_PORT", Settings.model_fields["port"].default))
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe_port(container, container[kind]) == port
    service = k8s_one(documents, "Service")
    (service_port,) = service["spec"]["ports"]
    assert probe_port(container, {"httpGet": {"port": service_port["targetPort"]}}) == port


def test_service_selects_the_deployments_pods(documents) -> None:
    deployment = k8s_one(documents, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = k8s_one(documents, "Service")["spec"]["selector"]
    assert selector.items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_startup_probe_allows_a_first_download_and_compile(container) -> None:
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= FIRST_START_SECONDS


def test_grace_period_covers_prestop_plus_the_configured_drain(pod, container, monkeypatch) -> None:
    from lnarize_serve.settings import load_settings

    for key, value in container_env(container).items():
        monkeypatch.setenv(key, value)
    drain = load_settings().drain_timeout  # through the real loader, as the server reads it
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + EXIT_MARGIN_SECONDS


def test_an_init_process_reaps_children_as_compose_init_does(pod) -> None:
    assert pod["shareProcessNamespace"] is True


def test_shm_is_a_memory_volume(pod, container) -> None:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"


def test_gpu_is_requested_and_token_comes_from_a_secret(container) -> None:
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    (token,) = [item for item in container["env"] if item["name"] == "HF_TOKEN"]
    assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"]


def test_every_lnarize_variable_is_a_valid_setting(container, monkeypatch) -> None:
    from lnarize_serve.settings import load_settings, unknown_env_vars

    env = container_env(container)
    assert not unknown_env_vars(env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    load_settings()
