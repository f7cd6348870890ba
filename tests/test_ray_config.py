"""deploy/ray/serve.yaml is valid to Ray Serve's own schema, and the KubeRay manifest embeds exactly it."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from tests.servers import HANG_S

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
    assert model.max_ongoing_requests >= 16 and model.health_check_period_s <= 2
    overload_is_answered_by_the_ingress(config)
    assert model.ray_actor_options is not None and model.ray_actor_options.num_gpus is not None
    assert model.graceful_shutdown_timeout_s >= 30  # RERANKER_DRAIN_SECONDS' default
    assert config.logging_config is not None and config.logging_config.encoding == "JSON"


def overload_is_answered_by_the_ingress(config: Any) -> None:
    """Serve counts max_queued_requests per caller, and the ingress is the JSON routes' one caller: it can hold
    every model replica's max_ongoing_requests and the queue behind them, so a full queue reaches it as 429
    `overloaded`, one process's answer. Before, the queue (1024) was out of the ingress's reach (512): overload
    waited at Serve's proxy until its 408."""
    model, ingress = config.applications[0].deployments
    assert model.autoscaling_config is not None and model.max_queued_requests > 0
    most = model.autoscaling_config["max_replicas"] * model.max_ongoing_requests + model.max_queued_requests
    assert ingress.max_ongoing_requests >= most
    # Beyond that, Serve's proxy answers 429 instead of queueing without bound.
    assert ingress.max_queued_requests > 0 and ingress.backpressure_config.status_code == 429
    # A rolling update starts a new replica before stopping an old one: a surge of at least one.
    assert model.max_surge_percent > 0


def test_serve_yaml_keeps_to_loopback() -> None:
    assert yaml.safe_load(SERVE_YAML.read_text())["http_options"]["host"] == "127.0.0.1"


def test_the_kuberay_manifest_embeds_serve_yaml_sized_for_a_gpu_cluster() -> None:
    """serve.yaml's proxies keep to loopback, as ./start.sh does, its model replicas run on the CPU and it has one
    ingress; a cluster's proxies take traffic from the pods' network, each model replica claims one of the GPU
    workers' GPUs and holds a GPU pass's worth of requests, and two ingresses keep serving while one is replaced.
    Those are the differences."""
    manifest = yaml.safe_load((ROOT / "deploy/ray/rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    overload_is_answered_by_the_ingress(schema.ServeDeploySchema.model_validate(embedded))
    assert embedded["http_options"]["host"] == "0.0.0.0"
    local = yaml.safe_load(SERVE_YAML.read_text())
    local["http_options"]["host"] = "0.0.0.0"
    model, ingress = local["applications"][0]["deployments"]
    assert model["ray_actor_options"]["num_gpus"] == 0 and ingress["num_replicas"] == 1
    model["ray_actor_options"]["num_gpus"] = 1
    model["max_ongoing_requests"], model["autoscaling_config"]["target_ongoing_requests"] = 64, 24
    ingress["num_replicas"] = 2
    assert embedded == local
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    containers = [c for w in workers for c in w["template"]["spec"]["containers"]]
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in containers]
    assert gpus and all(g == "1" for g in gpus)  # the GPU each replica claims is there
    # Room for the autoscaler's most replicas and a rolling update's surge replica, one GPU worker each.
    surge = -(-model["max_surge_percent"] * model["autoscaling_config"]["max_replicas"] // 100)
    assert sum(w["maxReplicas"] for w in workers) >= model["autoscaling_config"]["max_replicas"] + surge
    # Proxies on every interface: the JSON routes and the UI each need their login, from the secret; the head's
    # container too, where replicas run once it is given CPUs.
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    for container in [*head, *containers]:
        assert {"name": "RERANKER_MODEL", "value": "BAAI/bge-reranker-v2-m3"} in container["env"]
        # As the launcher's local Ray: no deprecated gauge twin of each counter (deploy/ray/__main__.py).
        assert {"name": "RAY_EXPORT_COUNTER_AS_GAUGE", "value": "0"} in container["env"]
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
        assert secrets == {"RERANKER_API_KEY": "reranker", "RERANKER_UI_AUTH": "reranker"}
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == schema_version()
    for worker in workers:  # a pod drains its Ray node before it stops (tests/test_ray_drain.py), in its grace period
        pod = worker["template"]["spec"]
        for container in pod["containers"]:
            command = container["lifecycle"]["preStop"]["exec"]["command"]
            assert command[:3] == ["python", "-m", "deploy.ray.drain"] and container["workingDir"] == "/app"
            deadline = int(command[command.index("--deadline-s") + 1])
            # Serve stops a replica not yet replaced in time to be done by the drain's deadline.
            longest = max(deployment["graceful_shutdown_timeout_s"] for app in embedded["applications"]
                          for deployment in app["deployments"])
            assert longest < deadline < pod["terminationGracePeriodSeconds"] - 5


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
    # As Settings reads them: spaces dropped, blank unset; "²" is a digit to str.isdigit, not a port.
    spaced = with_address(config, {"RERANKER_HOST": " 0.0.0.0 ", "RERANKER_PORT": " 8123\n"})["http_options"]
    assert (spaced["host"], spaced["port"]) == ("0.0.0.0", 8123)
    assert with_address(config, {"RERANKER_HOST": "  ", "RERANKER_PORT": " "}) == config
    for bad in ("²", "9" * 5000):
        with pytest.raises(ConfigError, match="RERANKER_PORT='[²9]+' is not valid"):
            with_address(config, {"RERANKER_PORT": bad})


def test_a_local_ray_offers_the_cpus_serve_yaml_claims_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a 2-core host Ray offered 2 logical CPUs: the model replica (1) and the ingress and UI (0.5 each) took
    them all, so an autoscaled replica or a rolling update's surge replica was never placed, and the update, which
    stops an old replica only once its new one runs, never ended."""
    import sys

    from deploy.ray import __main__ as launcher

    config = yaml.safe_load(SERVE_YAML.read_text())
    # 4 model replicas and a surge one; the ingress and its surge one; the UI.
    assert launcher.cpus_needed(config) == 1 * (4 + 1) + 0.5 * (1 + 1) + 0.5
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(init=lambda **kwargs: calls.append(kwargs)))
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 2)
    launcher.start_local_ray({}, launcher.cpus_needed(config))
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 64)
    launcher.start_local_ray({}, launcher.cpus_needed(config))
    assert [call["num_cpus"] for call in calls] == [7, 64]


def test_the_drain_deletes_only_the_configs_applications_and_leaves_a_clusters_serve_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import serve

    from deploy.ray import shutdown, stopping

    running = {"reranker": "RUNNING", "ui": "RUNNING", "someone-elses": "RUNNING"}
    steps: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications=dict(running)))
    monkeypatch.setattr(serve, "delete", lambda name, _blocking: running.pop(name))
    monkeypatch.setattr(shutdown, "drain_fronts", lambda apps, seconds: steps.append(("drain", list(apps))))
    monkeypatch.setattr(stopping, "withdraw_drain", lambda apps: steps.append(("withdraw", list(apps))))
    monkeypatch.setattr(shutdown.signal, "signal", lambda *args: None)
    with pytest.raises(SystemExit) as ended:  # on a cluster: `serve run`'s KeyboardInterrupt path stops all Serve
        shutdown.drain_then_stop(["reranker", "ui"], 30.0, remote=True)(15, None)
    assert ended.value.code == 0 and list(running) == ["someone-elses"]
    assert steps == [("drain", ["reranker", "ui"]), ("withdraw", ["reranker", "ui"])]
    with pytest.raises(KeyboardInterrupt):  # on its own Ray: `serve run` shuts Serve down
        shutdown.drain_then_stop(["reranker", "ui"], 30.0, remote=False)(15, None)


def test_a_second_signal_on_a_cluster_deletes_only_the_configs_applications(monkeypatch: pytest.MonkeyPatch) -> None:
    """It raised KeyboardInterrupt there too, on which `serve run` calls serve.shutdown(): every application on the
    shared cluster, and its controller and proxies, stopped. A third signal did the same."""
    from ray import serve

    from deploy.ray import shutdown, stopping

    running = {"reranker": "RUNNING", "ui": "RUNNING", "someone-elses": "RUNNING"}
    handlers: dict[int, Any] = {}
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications=dict(running)))
    monkeypatch.setattr(serve, "delete", lambda name, _blocking: running.pop(name))
    monkeypatch.setattr(shutdown, "front_replicas", lambda apps: set())
    monkeypatch.setattr(stopping, "announce_cut", lambda apps: None)
    monkeypatch.setattr(shutdown.signal, "signal", lambda signum, handler: handlers.__setitem__(signum, handler))
    with pytest.raises(SystemExit) as ended:
        shutdown.cut_then_stop(["reranker", "ui"], 0.0, remote=True)(15, None)
    assert ended.value.code == 1 and list(running) == ["someone-elses"]
    with pytest.raises(SystemExit):  # the third signal
        handlers[shutdown.signal.SIGTERM](15, None)
    # A third signal while the second one waits for the ingress to answer what it holds: ours are deleted all the same.
    running.update({"reranker": "RUNNING", "ui": "RUNNING"})

    def third_signal(apps: list[str], fronts: set[str], seconds: float, period_s: float = 0.1) -> bool:
        return handlers[shutdown.signal.SIGINT](2, None)

    monkeypatch.setattr(shutdown, "until_fronts_idle", third_signal)
    with pytest.raises(SystemExit):
        shutdown.cut_then_stop(["reranker", "ui"], 3.0, remote=True)(15, None)
    assert list(running) == ["someone-elses"]
    monkeypatch.setattr(shutdown, "until_fronts_idle", lambda *args: True)
    with pytest.raises(KeyboardInterrupt):  # on its own Ray: `serve run` shuts its Serve down
        shutdown.cut_then_stop(["reranker", "ui"], 0.0, remote=False)(15, None)
    assert handlers[shutdown.signal.SIGINT] is shutdown.signal.default_int_handler


def test_on_a_cluster_it_will_not_delete_applications_another_config_deployed(monkeypatch: pytest.MonkeyPatch,
                                                                                capsys: pytest.CaptureFixture[str]
                                                                                ) -> None:
    """`serve run` applies serve.yaml as the cluster's one declarative config, and Serve deletes the applications of
    the config before it that serve.yaml does not name (a team's `serve deploy`, a RayService's)."""
    import ray
    from ray.serve import context
    from ray.serve.schema import APIType

    from deploy.ray import __main__ as launcher
    from deploy.ray import stopping

    details = {"applications": {"reranker": {"source": APIType.DECLARATIVE}, "ui": {"source": "declarative"},
                                "theirs": {"source": APIType.DECLARATIVE}, "notebook": {"source": "imperative"}}}
    client = SimpleNamespace(get_serve_details=lambda: details)
    monkeypatch.setattr(context, "_get_global_client", lambda raise_if_no_controller_running: client)
    assert launcher.replaced_applications(["reranker", "ui"]) == ["theirs"]
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)

    def went_on(apps: list[str]) -> None:
        raise AssertionError("the launcher went on towards `serve run`")

    monkeypatch.setattr(stopping, "withdraw_drain", went_on)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(SystemExit) as ended:
        launcher.main([str(SERVE_YAML)])
    assert ended.value.code == 2 and "runs Serve applications from another config (theirs)" in capsys.readouterr().err
    monkeypatch.setattr(context, "_get_global_client", lambda raise_if_no_controller_running: None)
    assert launcher.replaced_applications(["reranker", "ui"]) == []  # no Serve there yet


def test_the_deploy_watch_stops_for_the_configs_applications_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another application failing on a shared cluster made the launcher drain and delete ours, and exit 1."""
    from ray import serve

    from deploy.ray import __main__ as launcher

    def app(status: str) -> SimpleNamespace:
        return SimpleNamespace(status=status, message="it broke", deployments={})

    states = {"reranker": app("RUNNING"), "someone-elses": app("DEPLOY_FAILED")}
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications=dict(states)))
    killed: list[int] = []
    monkeypatch.setattr(launcher.os, "kill", lambda pid, signum: killed.append(signum))
    watch = launcher.DeployWatch(["reranker"], period_s=0.0)
    watch._watch()  # returns once ours runs
    assert watch.failure is None and killed == []
    states["reranker"] = app("DEPLOY_FAILED")
    watch._watch()
    assert watch.failure is not None and watch.failure.startswith("reranker: it broke") and killed == [15]


def test_served_beyond_loopback_without_a_login_it_warns_as_start_sh_does() -> None:
    from deploy.ray.__main__ import exposure_warnings, with_address

    config = yaml.safe_load(SERVE_YAML.read_text())
    assert exposure_warnings(config, {}) == []  # loopback
    exposed = with_address(config, {"RERANKER_HOST": "0.0.0.0"})
    warnings = exposure_warnings(exposed, {})
    assert len(warnings) == 2 and "RERANKER_API_KEY" in warnings[0] and "RERANKER_UI_AUTH" in warnings[1]
    assert exposure_warnings(exposed, {"RERANKER_UI_AUTH": "a:b", "RERANKER_API_KEY": "k"}) == []
    assert exposure_warnings(exposed, {"RAY_ADDRESS": "ray://head:10001"}) == []  # the cluster's env, not ours


def login_in(config: dict[str, Any], application: str) -> dict[str, Any]:
    config = copy.deepcopy(config)
    [app] = [a for a in config["applications"] if a["name"] == application]
    app["args"]["env"] = {"RERANKER_UI_AUTH": "admin:secret"}
    return config


def test_a_login_set_for_one_application_only_is_named() -> None:
    """Set in the reranker application's args.env only (beside RERANKER_HOST, say), the UI stayed open with no
    warning: each application is judged by its own settings for what it serves, and a login set for one
    application and not the other is named."""
    from deploy.ray.__main__ import exposure_warnings, with_address

    exposed = with_address(yaml.safe_load(SERVE_YAML.read_text()), {"RERANKER_HOST": "0.0.0.0"})
    warnings = exposure_warnings(login_in(exposed, "reranker"), {"RERANKER_API_KEY": "k"})
    assert len(warnings) == 2 and warnings[0].startswith("the Gradio UI and Gradio API on 0.0.0.0 are open")
    assert warnings[1].startswith("RERANKER_UI_AUTH is set for application 'reranker' but not for 'ui'")
    # On loopback the UI is not exposed, but the login still does not guard it: named all the same.
    config = yaml.safe_load(SERVE_YAML.read_text())
    [mismatch] = exposure_warnings(login_in(config, "ui"), {})
    assert mismatch.startswith("RERANKER_UI_AUTH is set for application 'ui' but not for 'reranker'")
    # With a key, the reranker application needs no login: the ui application's guards all there is to guard.
    assert exposure_warnings(login_in(exposed, "ui"), {"RERANKER_API_KEY": "k"}) == []


def test_a_reranker_variable_nothing_reads_is_named_as_start_sh_names_it() -> None:
    from deploy.ray.__main__ import unknown_settings

    config = yaml.safe_load(SERVE_YAML.read_text())
    assert unknown_settings(config, {"RERANKER_PORT": "7860", "RERANKER_RAY_METRICS_PORT": "8080"}) == []
    assert unknown_settings(config, {"RERANKER_DTYPES": "bfloat16"}) == [
        "RERANKER_DTYPES is not a setting of this service and is ignored; did you mean RERANKER_DTYPE? the settings "
        "are listed in docs/configuration.md"]
    config["applications"][0].setdefault("args", {}).setdefault("env", {})["RERANKER_MAX_DOC"] = 5
    assert unknown_settings(config, {}) == [
        "application 'reranker', args.env: RERANKER_MAX_DOC is not a setting of this service and is ignored; did you "
        "mean RERANKER_MAX_DOCS? the settings are listed in docs/configuration.md"]
    # A setting of the service, but one the launcher reads: the proxies would stay on serve.yaml's port.
    config["applications"][0]["args"]["env"] = {"RERANKER_PORT": "9000"}
    assert unknown_settings(config, {}) == [
        "application 'reranker', args.env: RERANKER_PORT is read by this launcher from its own environment, not by "
        "a replica, and is ignored here; set it where python -m deploy.ray runs, or serve.yaml's http_options.port"]


def test_every_replica_sets_the_quiet_defaults_as_app_py_does() -> None:
    """`serve run` and KubeRay start the replicas without ./start.sh or app.py: the package sets the defaults that
    keep Gradio's analytics and the Hub's telemetry off before either library is imported."""
    from app import QUIET_DEFAULTS

    env = {k: v for k, v in os.environ.items() if k not in QUIET_DEFAULTS and k != "HF_HUB_OFFLINE"}
    probe = ("import os, deploy.ray.model, gradio.analytics, huggingface_hub.constants as hub\n"
             "print(gradio.analytics.analytics_enabled(), hub.HF_HUB_DISABLE_TELEMETRY,\n"
             "      {k: os.environ[k] for k in " + repr(sorted(QUIET_DEFAULTS)) + "})")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=HANG_S, check=True).stdout.strip()
    assert out == f"False True {dict(sorted(QUIET_DEFAULTS.items()))}"


def test_otel_variables_in_args_env_reach_the_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OTLP endpoint in serve.yaml's `args.env` turned tracing on, while the SDK, which reads the process
    environment only, exported to its default endpoint."""
    from deploy.ray.environment import replica_settings
    from reranker.tracing import otlp_exporter

    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    # Set through monkeypatch first, so that it is unset again after the test: replica_settings writes it into
    # os.environ, and every service a later test starts would trace to a dead port.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    monkeypatch.setenv("RERANKER_MAX_DOCS", "7")
    settings = replica_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4999", "RERANKER_MAX_DOCS": "9"})
    assert settings.tracing and settings.max_docs == 9  # args.env over the process's own
    exporter: Any = otlp_exporter(settings.tracing_protocol)
    assert exporter._endpoint == "http://127.0.0.1:4999/v1/traces"
    assert os.environ["RERANKER_MAX_DOCS"] == "7"  # only OTEL_* go into the process environment


def test_a_model_replica_ray_gave_no_gpu_runs_on_the_cpu(caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for a replica with num_gpus 0: RERANKER_DEVICE=auto then found
    the node's GPUs, and every such replica of a GPU node loaded onto cuda:0, outside Ray's accounting."""
    import ray._private.accelerators.accelerator as accelerator

    from deploy.ray.environment import on_assigned_device
    from reranker.settings import Settings

    assert accelerator.RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO_ENV_VAR  # the Ray change this answers, still there
    auto = Settings.from_env({})
    with caplog.at_level(logging.WARNING, logger="reranker"):
        assert on_assigned_device(auto, []).device == "cpu"
    assert not caplog.messages  # no GPU here: nothing to say
    monkeypatch.setattr("reranker.devices.cuda_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger="reranker"):
        assert on_assigned_device(auto, []).device == "cpu"
    assert caplog.messages[-1].startswith("Ray assigned this replica no GPU (num_gpus: 0), so it runs on the CPU")
    caplog.clear()
    assert on_assigned_device(auto, ["0"]).device == "auto"  # its own GPU: CUDA_VISIBLE_DEVICES names it
    explicit = Settings.from_env({"RERANKER_DEVICE": "cuda:1"})
    with caplog.at_level(logging.WARNING, logger="reranker"):
        assert on_assigned_device(explicit, []).device == "cuda:1"
    assert caplog.messages[0].startswith("RERANKER_DEVICE names a GPU but Ray assigned this replica none")
    assert on_assigned_device(Settings.from_env({"RERANKER_DEVICE": "cpu"}), []).device == "cpu"


def test_the_model_replica_takes_its_device_from_rays_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from prometheus_client import CollectorRegistry

    import deploy.ray.model as model
    from reranker.metrics import Metrics

    class Built(Exception):
        pass

    def capture(settings: Any, **kwargs: Any) -> None:
        raise Built(settings.device)

    monkeypatch.setattr(model, "assigned_gpus", lambda: [])
    # Outside a replica Ray's metrics and GPU ids would start a local Ray of their own (ray.init's auto-start).
    monkeypatch.setattr(model, "replica_metrics", lambda: Metrics(CollectorRegistry()))
    monkeypatch.setattr(model, "replica_gpus", lambda gpu_ids: None)
    monkeypatch.setattr(model.Reranker, "from_settings", capture)
    with pytest.raises(Built, match="^cpu$"):
        model.RerankModel({"RERANKER_DEVICE": "auto"})
    assert not ray.is_initialized()


def test_the_launchers_json_line_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """print wrote the text and its newline apart, and Ray's thread printing the replicas' log lines on the same
    stream got in between: test_ray_start read a JSON line with Ray's line run into it."""
    from deploy.ray import shutdown

    writes: list[bytes] = []

    def write(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return len(data)

    monkeypatch.setattr(shutdown.os, "write", write)
    shutdown.log("ERROR", "deploying failed, stopping: é" + "x" * 5000, applications=["reranker"])
    (written,) = writes
    assert written.endswith(b"}\n") and written.count(b"\n") == 1
    assert json.loads(written)["message"] == "deploying failed, stopping: é" + "x" * (4000 - 29)
