"""SERVE.md's "Scaling out" section agrees with the manifests and the code."""

from __future__ import annotations

import json
import re

import pytest
from shipfiles import REPO_ROOT, k8s_all, k8s_documents, k8s_one

SECTION = (REPO_ROOT / "SERVE.md").read_text().split("## Scaling out", 1)[1].split("\n## ", 1)[0]


def table_rows(heading: str) -> list[list[str]]:
    part = SECTION.split(heading, 1)[1]
    rows = []
    for line in part.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows and not line.startswith("|"):
            break
    return rows[1:]  # without the header


def parallel_settings() -> list[dict]:
    rows = table_rows("### Several GPUs for one replica")
    return [json.loads(re.fullmatch(r"`LNARIZE_ENGINE_ARGS='(.*)'`", row[1]).group(1)) for row in rows]


@pytest.mark.parametrize("engine_args", parallel_settings(), ids=lambda args: next(iter(args)))
@pytest.mark.vllm  # vLLM's AsyncEngineArgs
def test_each_parallel_setting_reaches_the_engine_arguments(engine_args, monkeypatch) -> None:
    from lnarize_serve.engine_args import build_engine_args
    from lnarize_serve.settings import load_settings

    monkeypatch.setenv("LNARIZE_ENGINE_ARGS", json.dumps(engine_args))
    args = build_engine_args(load_settings())
    for name, value in engine_args.items():
        assert getattr(args, name) == value


def test_the_three_parallel_options_are_listed() -> None:
    assert [next(iter(args)) for args in parallel_settings()] == [
        "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"
    ]


def test_served_names_objectives_and_timeouts_are_the_manifests() -> None:
    for overlay, timeout in (("interactive", "300 s"), ("long-context", "1800 s")):
        documents = k8s_documents(overlay)
        env = {e["name"]: e.get("value") for e in
               k8s_one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert f"serves `{env['LNARIZE_SERVED_MODEL_NAME']}`" in SECTION.replace("\n", " ")
        assert timeout in SECTION
        for objective in k8s_all(documents, "InferenceObjective"):
            generic = objective["metadata"]["name"].replace(overlay, "<overlay>")
            assert f"`{generic}` {objective['spec']['priority']}" in SECTION


def test_the_autoscaling_numbers_are_the_manifests() -> None:
    interactive = k8s_one(k8s_documents("interactive"), "HorizontalPodAutoscaler")["spec"]
    long_context = k8s_one(k8s_documents("long-context"), "HorizontalPodAutoscaler")["spec"]
    text = SECTION.replace("\n", " ")
    target = interactive["metrics"][0]["pods"]["target"]["averageValue"]
    long_target = long_context["metrics"][0]["pods"]["target"]["averageValue"]
    assert f"more than {target} requests wait per pod on average (long-context: {long_target})" in text
    assert f"{interactive['minReplicas']} to {interactive['maxReplicas']} replicas" in text
    up = interactive["behavior"]["scaleUp"]["policies"][0]
    down = interactive["behavior"]["scaleDown"]
    assert f"one pod per {up['periodSeconds'] // 60} minutes at most" in text
    assert (f"one per {down['policies'][0]['periodSeconds'] // 60} minutes after "
            f"{down['stabilizationWindowSeconds'] // 60} quiet minutes") in text


def test_the_quoted_crd_releases_are_the_vendored_ones() -> None:
    from crd_schemas import pinned_sources

    commands = [line for line in SECTION.splitlines() if line.startswith("kubectl apply")]
    for source in pinned_sources().values():
        repository, tag = source["repository"], source["tag"]
        kustomization = source["path"].rsplit("/", 2)[0]  # config/crd, which lists the file
        quoted = (f"https://github.com/{repository}/{kustomization}?ref={tag}",
                  f"https://raw.githubusercontent.com/{repository}/{tag}/{source['path']}")
        assert any(url in command for command in commands for url in quoted), source
