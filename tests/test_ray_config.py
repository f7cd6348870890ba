"""deploy/ray/serve.yaml is valid to Ray Serve's own schema, and the KubeRay manifest embeds exactly it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

schema = pytest.importorskip("ray.serve.schema", reason="needs requirements-ray.txt")

ROOT = Path(__file__).resolve().parent.parent
SERVE_YAML = ROOT / "deploy/ray/serve.yaml"


def test_serve_yaml_passes_ray_serves_schema() -> None:
    config = schema.ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    app, ui = config.applications
    assert app.import_path == "deploy.ray.app:build" and app.route_prefix == "/"
    # Gradio's queue and login sessions are one process's: the UI never has a second replica.
    assert ui.import_path == "deploy.ray.ui:build" and ui.route_prefix == "/ui"
    assert ui.args["app"] == app.name and [d.num_replicas for d in ui.deployments] == [1]
    model, ingress = app.deployments
    assert model.name == "RerankModel" and ingress.name == "Ingress"
    # What the issue measured: Serve's default of 5 starves the batcher; a 10 s health check period took 15 s
    # to replace a killed replica.
    assert model.max_ongoing_requests >= 32 and ingress.max_ongoing_requests >= model.max_ongoing_requests
    assert model.autoscaling_config is not None and model.health_check_period_s <= 2
    assert model.ray_actor_options is not None and model.ray_actor_options.num_gpus is not None
    assert model.graceful_shutdown_timeout_s >= 30  # RERANKER_DRAIN_SECONDS' default
    assert config.logging_config is not None and config.logging_config.encoding == "JSON"


def test_serve_yaml_keeps_to_loopback() -> None:
    assert yaml.safe_load(SERVE_YAML.read_text())["http_options"]["host"] == "127.0.0.1"


def test_the_kuberay_manifest_embeds_serve_yaml_on_every_interface_with_a_gpu_per_replica() -> None:
    """serve.yaml's proxies keep to loopback, as ./start.sh does, and its model replicas run on the CPU; a cluster's
    proxies take traffic from the pods' network, and each model replica claims one of the GPU workers' GPUs.
    Those are the two differences."""
    manifest = yaml.safe_load((ROOT / "deploy/ray/rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded["http_options"]["host"] == "0.0.0.0"
    local = yaml.safe_load(SERVE_YAML.read_text())
    local["http_options"]["host"] = "0.0.0.0"
    model = next(d for d in local["applications"][0]["deployments"] if d["name"] == "RerankModel")
    assert model["ray_actor_options"]["num_gpus"] == 0
    model["ray_actor_options"]["num_gpus"] = 1
    assert embedded == local
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    containers = [c for w in workers for c in w["template"]["spec"]["containers"]]
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in containers]
    assert gpus and all(g == "1" for g in gpus)  # the GPU each replica claims is there
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == schema_version()


def test_the_application_builder_binds_the_ingress_over_the_model() -> None:
    from deploy.ray.app import build

    app = build({"env": {"RERANKER_MAX_DOCS": "7"}, "tries": 2})
    assert type(app).__name__ == "Application"


def schema_version() -> str:
    from importlib.metadata import version

    return version("ray")


def test_reranker_host_and_port_replace_the_proxies_address_where_set() -> None:
    from deploy.ray.__main__ import ConfigError, with_address

    config = yaml.safe_load(SERVE_YAML.read_text())
    assert with_address(config, {}) == config
    moved = with_address(config, {"RERANKER_HOST": "0.0.0.0", "RERANKER_PORT": "8123"})["http_options"]
    assert (moved["host"], moved["port"]) == ("0.0.0.0", 8123)
    assert moved["request_timeout_s"] == config["http_options"]["request_timeout_s"]
    with pytest.raises(ConfigError, match="RERANKER_PORT='http' is not valid"):
        with_address(config, {"RERANKER_PORT": "http"})
