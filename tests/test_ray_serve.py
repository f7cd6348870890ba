"""The Ray Serve mode on a local loopback Ray (2 CPU replicas of a tiny model behind the ingress): same answers
as one process, every replica serving, no request lost to a killed replica, a rolling update or a client that
leaves, autoscaling up and down. One Ray cluster for the whole module (it takes ~10 s and ~1.5 GiB)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="needs requirements-ray.txt")

import collections  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import httpx  # noqa: E402
import yaml  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from ray import serve  # noqa: E402

from deploy.ray.remote import running_replicas  # noqa: E402
from reranker import Reranker, spans  # noqa: E402
from reranker.metrics import LATENCY_BUCKETS, Metrics  # noqa: E402
from reranker.model import ScoringModel  # noqa: E402
from tests.conftest import TEST_MAX_LENGTH, model_settings  # noqa: E402
from tests.otlp_receiver import otlp_receiver  # noqa: E402
from tests.ray_cluster import (  # noqa: E402
    ROOT,
    LocalRay,
    deploy,
    descendants,
    device_held,
    local_ray,
    replica_pids,
    worker_log_lines,
)
from tests.ray_load import HEADERS, KEY, Load  # noqa: E402
from tests.servers import HANG_S, post_head  # noqa: E402
from tests.test_prometheus import (  # noqa: E402
    ALERTS,
    SERVE_CONFIG,
    _tool,
    api,
    dashboard_exprs,
    load_dashboard,
    load_yaml,
    metric_names,
    running_prometheus,
)

T = TypeVar("T")

APP = "reranker"
MODEL = "RerankModel"
IDLE_S = 30.0  # twice as long as Ray 2.60 kept exporting a gauge nobody set (deploy/ray/metrics.py)
REPLACED_WITHIN_S = 30.0  # from the SIGKILL of a replica to two running replicas again (see the test)


def app_config(model_dir: Path, *, replicas: int = 2, ui: bool = False, **env: str) -> dict[str, Any]:
    """deploy/ray/serve.yaml as it is, but for the tiny model, fixed replicas and the cluster's own HTTP port;
    without the UI application unless `ui`."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text())
    del config["http_options"]  # local_ray started Serve on a free loopback port
    if not ui:
        config["applications"] = config["applications"][:1]
    environ = {"RERANKER_MODEL": str(model_dir), "RERANKER_DEVICE": "cpu", "RERANKER_DTYPE": "float32",
               "RERANKER_MAX_LENGTH": str(TEST_MAX_LENGTH), "RERANKER_API_KEY": KEY, **env}
    for application in config["applications"]:
        application["args"]["env"] = environ
        for deployment in application["deployments"]:
            deployment["ray_actor_options"]["num_cpus"] = 0.5
    app = config["applications"][0]
    model = app["deployments"][0]
    del model["autoscaling_config"]
    model["num_replicas"] = replicas
    return config


def gated(config: dict[str, Any], gate: Path) -> dict[str, Any]:
    """`config` with model replicas whose device a test holds by a file in `gate` (tests/ray_cluster.py's
    gated_app and device_held)."""
    application = config["applications"][0]
    application["import_path"] = "tests.ray_cluster:gated_app"
    application["args"]["gate"] = str(gate)
    return config


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first deployment's device gate (device_held): open unless a test holds it."""
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def cluster(bert_dir: Path, gate: Path) -> Iterator[LocalRay]:
    with local_ray({}) as running:
        deploy(gated(app_config(bert_dir), gate), APP)
        yield running


def wait_for(condition: Any, timeout: float, what: str) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def test_mixed_load_scores_as_one_process_on_every_replica(cluster: LocalRay, bert_model: ScoringModel,
                                                             bert_dir: Path) -> None:
    load = Load(cluster.url, clients=4, seed=1).start()
    try:
        wait_for(lambda: load.total >= 120 and len(load.replicas) >= 2, 120, "120 answers from both replicas")
    finally:
        load.stop()
    assert load.failures == {}
    assert len([r for r in load.replicas if r]) == 2, load.replicas
    with Reranker(bert_model, model_settings(bert_dir)) as local:
        for path, query, docs, scores in load.answers[:60]:
            expected = {r.index: r.score for r in local.rerank(query, docs)}
            assert scores.keys() == expected.keys(), path
            assert all(abs(scores[i] - expected[i]) < 1e-5 for i in scores), path


def test_same_errors_limits_and_auth_as_one_process(cluster: LocalRay) -> None:
    url = cluster.url
    assert httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["a"]}, timeout=HANG_S).status_code == 401
    bad = httpx.post(f"{url}/v1/rerank", json={"query": "q"}, headers=HEADERS, timeout=HANG_S)
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_shape"
    empty = httpx.post(f"{url}/rerank", json={"query": "", "texts": ["a"]}, headers=HEADERS, timeout=HANG_S)
    assert empty.status_code == 400 and empty.json()["error_type"] == "Empty"  # TEI's error shape and name
    cohere = httpx.post(f"{url}/v2/rerank", json={"model": "m", "query": "", "documents": ["a"]}, headers=HEADERS,
                        timeout=HANG_S)
    assert cohere.status_code == 400 and set(cohere.json()) == {"id", "message"}  # Cohere's error shape
    assert httpx.get(f"{url}/v1/rerank", headers=HEADERS, timeout=HANG_S).status_code == 405
    assert httpx.get(f"{url}/readyz", timeout=HANG_S).json()["status"] == "ready"
    info = httpx.get(f"{url}/info", timeout=HANG_S).json()
    assert info["device"] == "cpu" and info["limits"]["max_docs"] == 1000
    assert info["auth"] == {"api_key": True, "ui_login": False}  # the replicas read the key the ingress checks
    answer = httpx.post(f"{url}/rerank", json={"query": "q", "texts": ["a"]},
                        headers={**HEADERS, "x-request-id": "given-id-1"}, timeout=HANG_S)
    assert answer.headers.get_list("x-request-id") == ["given-id-1"]


def recent(selector: str) -> str:
    """The series' latest sample within three scrapes: one failed scrape (its series marked stale) does not empty
    the answer, and a series that stopped being exported is gone from it within 6 s."""
    return f"last_over_time({selector}[6s])"


def test_prometheus_scrapes_every_replica_through_ray(cluster: LocalRay, tmp_path: Path) -> None:
    """monitoring/prometheus-serve.yml's Ray job, pointed at this node's metrics agent: each replica's reranker_*
    series under the single-process names with its `replica` label (the one X-Reranker-Replica named), Ray's
    ray_serve_*, and the alert rules evaluating on them."""
    (job,) = load_yaml(SERVE_CONFIG)["scrape_configs"]
    # Ray's metrics agent answers a scrape from a Python process on a loaded machine: 2 s to do it, and the instant
    # queries below read through one failed scrape (which marks every series stale until the next) with
    # last_over_time over a few scrapes.
    job = {**job, "scrape_interval": "2s", "scrape_timeout": "2s",
           "static_configs": [{"targets": [f"127.0.0.1:{cluster.metrics_port}"]}]}
    load = Load(cluster.url, clients=4, seed=6).start()
    try:
        wait_for(lambda: load.total >= 40 and len(load.replicas) >= 2, 120, "40 answers from both replicas")
    finally:
        load.stop()
    idle_since = time.monotonic()
    served = {replica for replica in load.replicas if replica}
    assert len(served) == 2, load.replicas
    with running_prometheus(_tool("prometheus"), tmp_path, jobs=[job], rule_files=[ALERTS]) as url:
        def replicas() -> set[str]:
            query = 'sum by (replica) (reranker_requests_total{job="ray", deployment="RerankModel", status="ok"})'
            return {row["metric"]["replica"] for row in api(url, "query", query=query)["result"]}

        wait_for(lambda: replicas() >= served, 120, f"reranker_requests_total of replicas {served}")
        assert api(url, "query", query=recent('ray_serve_deployment_request_counter_total{deployment="RerankModel"}'))[
            "result"]
        assert api(url, "query", query='{__name__=~"ray_reranker_.+"}')["result"] == []  # all renamed
        buckets = api(url, "query", query=recent('reranker_request_duration_seconds_bucket{deployment="RerankModel"}'))
        assert {float(row["metric"]["le"]) for row in buckets["result"]} == {*LATENCY_BUCKETS, float("inf")}
        info = api(url, "query", query=recent("reranker_model_info"))["result"]
        assert {row["metric"]["replica"] for row in info} >= served and info[0]["metric"]["device"] == "cpu"
        # Every series the dashboard and the alerts read is exported in this mode too (GPU ones need a GPU).
        exported = set(api(url, "label/__name__/values"))
        read = {name for expr in dashboard_exprs(load_dashboard()) for name in metric_names(expr)}
        read |= {name for rule in load_yaml(ALERTS)["groups"][0]["rules"] for name in metric_names(rule["expr"])}
        assert {name for name in read - exported if not name.startswith("reranker_gpu_")} == set()
        # Ray also exported each counter as a deprecated gauge of its bare name (reranker_requests beside
        # reranker_requests_total), which one process has no twin of.
        counters = {family.name for family in Metrics(CollectorRegistry()).registry.collect()
                    if family.type == "counter"}
        assert counters and not counters & exported, counters & exported

        def evaluated() -> list[dict[str, Any]]:
            rules = [rule for group in api(url, "rules")["groups"] for rule in group["rules"]]
            return rules if all(rule["health"] != "unknown" for rule in rules) else []

        wait_for(lambda: bool(evaluated()), HANG_S, "the alert rules to be evaluated")
        for rule in evaluated():
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"

        # A gauge nobody sets while idle (the queue's depth) is still exported: Ray 2.60 stopped exporting one ~15 s
        # after the load stopped, and every alert on it with it, until each replica set its gauges again every 5 s.
        time.sleep(max(0.0, idle_since + IDLE_S - time.monotonic()))
        queue = api(url, "query", query=recent('reranker_queue_pairs{deployment="RerankModel"}'))["result"]
        assert {row["metric"]["replica"] for row in queue} >= served


def test_loopback_only(cluster: LocalRay) -> None:
    """Every TCP socket of Ray's processes has loopback ends. The one exception is Serve's own: each replica's
    inter-deployment gRPC server listens on [::]:0, hard-coded in ray 2.60 (serve/_private/replica.py)."""
    load = Load(cluster.url, clients=2, seed=5).start()
    try:
        wait_for(lambda: load.total >= 20, HANG_S, "load running")
        sockets = tcp_sockets(descendants(os.getpid()))
    finally:
        load.stop()
    assert len(sockets) > 20, sockets
    # A listening socket has no remote end (it reads 0.0.0.0 or ::): its local address alone says where it listens.
    outside = [s for s in sockets if not (_loopback(s[0]) and (s[2] == "LISTEN" or _loopback(s[1])))
               and not (s[2] == "LISTEN" and s[0] == "::" and "ServeReplica" in s[3])]
    assert not outside, outside


def _loopback(address: str) -> bool:
    return address.startswith(("127.", "::ffff:127.")) or address == "::1"


def tcp_sockets(pids: set[int]) -> list[tuple[str, str, str, str]]:
    """(local address, remote address, state, process title) of every TCP socket these processes hold."""
    owner: dict[str, str] = {}
    for pid in pids:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owner[target[8:-1]] = f"{pid} {title}"
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[9] in owner:
                state = "LISTEN" if fields[3] == "0A" else "ESTABLISHED" if fields[3] == "01" else fields[3]
                found.append((_address(fields[1], v6), _address(fields[2], v6), state, owner[fields[9]]))
    return found


def _address(hex_address: str, v6: bool) -> str:
    import ipaddress

    host = bytes.fromhex(hex_address.split(":")[0])
    if not v6:
        return str(ipaddress.IPv4Address(host[::-1]))
    words = b"".join(host[i:i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(words)
    return f"::ffff:{address.ipv4_mapped}" if address.ipv4_mapped else str(address)


def replaced_under_load(cluster: LocalRay, seed: int, disrupt: Callable[[], T], what: str) -> tuple[float, int, T]:
    """Under load from 4 clients, `disrupt()` one of the two model replicas, then wait until a new one runs beside
    the other and the load has gone on after it: the seconds until the replacement ran, its pid, and what
    `disrupt` returned. No client may have seen a failure."""
    load = Load(cluster.url, clients=4, seed=seed).start()
    try:
        wait_for(lambda: load.total >= 20, HANG_S, "load running")
        before = set(replica_pids(APP, MODEL))
        disrupted = disrupt()
        replaced = wait_for(lambda: running_replicas(APP, MODEL) == 2 and len(set(replica_pids(APP, MODEL)) - before)
                            == 1, HANG_S, what)
        (replacement,) = set(replica_pids(APP, MODEL)) - before
        served = load.total
        wait_for(lambda: load.total >= served + 20, HANG_S, "load served after the replacement")
    finally:
        load.stop()
    assert load.failures == {}, load.failures
    return replaced, replacement, disrupted


def retries(cluster: LocalRay) -> int:
    """How many calls the ingress has sent again after their replica could not serve them."""
    return sum(1 for line in worker_log_lines(cluster)
               if line.get("message") == "replica could not serve a request" and line.get("retry") is True)


def test_a_killed_replica_loses_no_request(cluster: LocalRay, gate: Path) -> None:
    """The replica is killed while it holds a batch, so requests certainly die with it: each must be sent again."""
    retried = retries(cluster)

    def kill() -> None:
        victim = replica_pids(APP, MODEL)[0]
        with device_held(gate):
            wait_for((gate / f"holding-{victim}").exists, HANG_S, "a batch held on the replica to kill")
            os.kill(victim, signal.SIGKILL)

    # About 9 s on a 2-core host that this load saturates, 5 s quiet: the new process starts Ray's worker and
    # imports Ray Serve and OpenVINO, then starts its model from the conversion cache (docs/scale-out.md).
    recovered, replacement, _ = replaced_under_load(cluster, 2, kill, "a replacement replica")
    print(f"replica replaced in {recovered:.1f} s after the kill")
    # The budget is 10 s, which a saturated 2-core host meets with little room (8.5-9.7 s measured; 14.5 s
    # with one core taken by another process). Three times that bounds it here without flaking; a replacement that
    # loads the model in full (26.5 s) fails the from_cache check below, whatever its time.
    assert recovered < REPLACED_WITHIN_S, f"the replacement took {recovered:.1f} s"
    assert retries(cluster) > retried, "no request was on the killed replica"
    # The replacement started from what the first replicas stored, without torch, transformers or their weights.
    assert any(line.get("message") == "model loaded" and line.get("from_cache")
               for line in worker_log_lines(cluster, replacement))


def test_a_replica_whose_device_failed_loses_no_request(cluster: LocalRay, bert_dir: Path) -> None:
    """A replica whose device failed answers every call at once with 503 not_ready, so Serve's router, which
    favours the least busy replica, sent it most of the traffic: 64 503s reached the clients in 3.5 s while the
    other replica was free. The ingress retries such an answer on another replica, and the failed replica ends
    itself (deploy/ray/model.py's check_health), so Serve replaces it. Redeploys the model replicas with a
    fault switch (tests/ray_cluster.py's faulty_app; the next test redeploys them)."""
    config = app_config(bert_dir)
    config["applications"][0]["import_path"] = "tests.ray_cluster:faulty_app"
    before = set(replica_pids(APP, MODEL))
    deploy(config, APP)
    wait_for(lambda: running_replicas(APP, MODEL) == 2 and not set(replica_pids(APP, MODEL)) & before, 120,
             "two replicas with a fault switch")
    failing = serve.get_deployment_handle(MODEL, APP)
    replaced, _, failed = replaced_under_load(
        cluster, 8, lambda: failing.fail_device.remote().result(timeout_s=HANG_S),
        "a replacement for the replica whose device failed")
    print(f"the replica whose device failed was replaced in {replaced:.1f} s")
    assert any(line.get("message") == "the scoring device failed: this replica ends" and line.get("replica") == failed
               for line in worker_log_lines(cluster))


def test_overload_is_answered_as_one_process_and_readiness_holds_under_it(cluster: LocalRay, bert_dir: Path,
                                                                          tmp_path: Path) -> None:
    """One replica taking one request at a time and queueing one more: a burst beyond that is one process's
    overload (429 overloaded, Retry-After: 1), not Serve's plain-text 503 'Request dropped due to backpressure';
    /readyz, meanwhile, is the controller's count of running replicas, not a call queued behind the burst (which
    answered 503 after 5 s), and /info what the replica published (a call got the burst's 429). With
    RERANKER_UI_AUTH and no API key, /api/predict needs the UI's login, as in one process, and the ingress cannot
    see that login: 401. Redeploys (the next test redeploys again)."""
    import threading

    config = gated(app_config(bert_dir, replicas=1, RERANKER_UI_AUTH="admin:secret"), tmp_path)
    del config["applications"][0]["args"]["env"]["RERANKER_API_KEY"]
    model = config["applications"][0]["deployments"][0]
    model["max_ongoing_requests"], model["max_queued_requests"] = 1, 1
    redeploy_one_replica(config, "one model replica and an ingress of the new config")
    # The ingress learns the model id that /readyz names from the replicas' answers.
    assert httpx.post(f"{cluster.url}/rerank", json={"query": "q", "texts": ["a"]}, timeout=HANG_S).status_code == 200
    answers: list[httpx.Response] = []

    def one(i: int) -> None:
        body = {"query": f"q{i}", "documents": ["a", "b"]}
        answers.append(httpx.post(f"{cluster.url}/v1/rerank", json=body, timeout=HANG_S))

    # The replica's one slot is held, so of a burst of 7 one waits in the queue and 6 find it full, whatever the
    # machine's speed (sent unheld, a fast backend answered the burst one by one: no 429).
    with device_held(tmp_path) as holding:
        first = threading.Thread(target=one, args=(0,))
        first.start()
        wait_for(holding.exists, HANG_S, "the first request on the replica's device")
        burst = [threading.Thread(target=one, args=(i,)) for i in range(1, 8)]
        for thread in burst:
            thread.start()
        wait_for(lambda: len(answers) == 6, HANG_S, "six answers while the device is held")
        ready = httpx.get(f"{cluster.url}/readyz", timeout=HANG_S)
        info = httpx.get(f"{cluster.url}/info", timeout=HANG_S)  # what the replica published: no call queued
    for thread in [first, *burst]:
        thread.join(HANG_S)
    assert ready.status_code == 200, ready.text
    assert info.status_code == 200 and info.json()["replica"] and info.json()["device"] == "cpu", info.text
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200] * 2 + [429] * 6, statuses
    for answer in answers:
        if answer.status_code == 429:
            assert answer.headers["retry-after"] == "1" and answer.json()["error"]["type"] == "overloaded"
    # Each 429 is logged once, by its request line; Serve's router added a WARNING naming no request.
    assert not [path for path in (cluster.temp / "session_latest" / "logs").rglob("*") if path.is_file()
                and "Request dropped due to backpressure" in path.read_text(errors="replace")]
    predict = httpx.post(f"{cluster.url}/api/predict", json={"data": ["q", ["a"]]}, timeout=HANG_S)
    assert predict.status_code == 401 and predict.json()["error"]["type"] == "unauthorized"


def app_pids() -> set[int]:
    """The process ids of the application's model and ingress replicas."""
    return set(replica_pids(APP, MODEL)) | set(replica_pids(APP, "Ingress"))


def redeploy_one_replica(config: dict[str, Any], what: str) -> None:
    """Deploy `config` (one model replica) and wait until new replicas of both deployments run it."""
    before = app_pids()
    deploy(config, APP)
    wait_for(lambda: running_replicas(APP, MODEL) == 1 and running_replicas(APP, "Ingress") == 1
             and not app_pids() & before, 120, what)


def test_a_client_that_leaves_while_its_request_waits_for_a_replica_is_counted_once(cluster: LocalRay,
                                                                                     bert_dir: Path,
                                                                                     tmp_path: Path) -> None:
    """One replica taking one request at a time, busy with one (held on its device by the test): a request
    queued behind it whose client leaves never reaches a replica, and went uncounted and unlogged (only Ray's
    proxy saw its 499). The ingress counts it `cancelled`, once; a request a replica held is still counted by that
    replica alone. Redeploys (the next test redeploys again)."""
    import threading

    # Every request line written.
    config = gated(app_config(bert_dir, replicas=1, RERANKER_LOG_SAMPLE_RATE="1"), tmp_path)
    config["applications"][0]["deployments"][0]["max_ongoing_requests"] = 1
    redeploy_one_replica(config, "one model replica taking one request at a time")
    held: list[int] = []

    def hold() -> None:
        answer = httpx.post(f"{cluster.url}/v1/rerank", json={"query": "hold", "documents": ["a", "b"]},
                            headers={**HEADERS, "x-request-id": "holder"}, timeout=HANG_S)
        held.append(answer.status_code)

    holder = threading.Thread(target=hold)
    with device_held(tmp_path) as holding:  # the holder keeps the replica's one slot until the block ends
        holder.start()
        wait_for(holding.exists, HANG_S, "the holder on the replica's device")
        # Nothing can answer it (it waits for the held slot); it leaves after long enough to have reached the
        # ingress's call to the model through Ray's proxy on a loaded machine.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{cluster.url}/v1/rerank", json={"query": "queued", "documents": ["a", "b"]},
                       headers={**HEADERS, "x-request-id": "queued"}, timeout=httpx.Timeout(30, read=8.0))
        wait_for(lambda: request_lines(cluster, "queued"), HANG_S, "the queued request's line")
    holder.join(HANG_S)
    assert held == [200]
    wait_for(lambda: request_lines(cluster, "queued") and request_lines(cluster, "holder"), HANG_S,
             "the request lines")
    time.sleep(1.0)  # a second line, were there one, would be written by now
    (queued,) = request_lines(cluster, "queued")
    assert (queued["message"], queued["status"], queued["http_status"]) == ("rerank refused", "cancelled", 499)
    assert "waited for a model replica" in queued["error"]
    (holder_line,) = request_lines(cluster, "holder")
    assert holder_line["status"] == "ok"


def request_lines(cluster: LocalRay, request_id: str) -> list[dict[str, Any]]:
    """The request log lines of `request_id`, from every replica of every deployment."""
    return [line for line in worker_log_lines(cluster)
            if line.get("request_id") == request_id and line.get("logger") == "reranker.requests"]


def test_a_client_disconnect_cancels_the_replica_call(cluster: LocalRay, bert_dir: Path, tmp_path: Path) -> None:
    """The client leaves while its request is on a replica's device (held there by the test: a long request
    timed by a read timeout raced a fast backend). Counted once, `cancelled`, by that replica. Redeploys (the
    next test redeploys again)."""
    redeploy_one_replica(gated(app_config(bert_dir, replicas=1, RERANKER_LOG_SAMPLE_RATE="1"), tmp_path),
                         "a model replica behind a gate")

    def lines() -> list[dict[str, Any]]:
        return request_lines(cluster, "leaves")

    with device_held(tmp_path) as holding:
        post_then_leave(cluster.url, "/v1/rerank", {"query": "cancel me", "documents": ["a", "b", "c"]},
                        {**HEADERS, "x-request-id": "leaves"}, holding.exists)
        wait_for(lines, HANG_S, "the request's line")  # written while its batch is still held: dropped at once
    time.sleep(1.0)  # a second line, were there one, would be written by now
    # Counted once, by the replica that held it; the ingress adds no line of its own.
    (line,) = lines()
    assert line["message"] in ("rerank", "slow rerank") and (line["status"], line["route"]) == (
        "cancelled", "/v1/rerank"), line


def test_a_cancelled_call_is_counted_by_whoever_claims_it_first(cluster: LocalRay, bert_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray 2.60 can hand a call to a model replica after the ingress's cancel() withdrew it, and the ingress
    counted the withdrawal: the replica then saw it cancelled and counted it too. Both now claim the call's id in
    Ray's key-value store, and only the first counts it. Here the ingress's claim is made first, by hand, and the
    call sent straight to the replica and cancelled there: the replica books nothing. A call nobody claimed is
    booked by the replica, once. The keys do not stay: the loser deletes one, a later claim deletes those past
    FORGET_S, and the launcher's withdraw_drain every key of the application. Redeploys (the next test
    redeploys again)."""
    from deploy.ray import claims
    from deploy.ray.stopping import NAMESPACE, kv_store, withdraw_drain
    from web.service import RerankCall

    def exists(call_id: str) -> bool:
        return bool(kv_store()._internal_kv_exists(claims.call_key(APP, call_id), namespace=NAMESPACE))

    redeploy_one_replica(gated(app_config(bert_dir, replicas=1, RERANKER_LOG_SAMPLE_RATE="1"), tmp_path),
                         "a model replica behind a gate")
    handle = serve.get_deployment_handle(MODEL, APP)
    assert claims.claim_left(APP, "ingress-first") and exists("ingress-first")
    with device_held(tmp_path) as holding:
        responses = [handle.rerank.remote("/v1/rerank", RerankCall("q", ["a", "b"]), request_id, {}, None, None,
                                          call_id)
                     for request_id, call_id in (("withdrawn", "ingress-first"), ("held", "nobody-else"))]
        wait_for(holding.exists, HANG_S, "the calls on the replica's device")
        for response in responses:
            response.cancel()
        wait_for(lambda: request_lines(cluster, "held"), HANG_S, "the held call's line")
    time.sleep(1.0)  # the withdrawn call's line, were there one, would be written by now
    assert request_lines(cluster, "withdrawn") == []
    (line,) = request_lines(cluster, "held")
    assert line["status"] == "cancelled", line
    # Deleted by the replica, which lost it, on a path of its own (a GCS put, then the delete).
    wait_for(lambda: not exists("ingress-first"), HANG_S, "the lost claim's key deleted")
    assert exists("nobody-else")  # won alone: kept FORGET_S, for a late second claim
    monkeypatch.setattr(claims, "FORGET_S", 0.0)
    monkeypatch.setattr(claims, "_claimed", collections.deque())  # "ingress-first" would be due in a minute
    assert claims.claim_left(APP, "later") and not exists("later")  # past FORGET_S: deleted with the next claim
    assert exists("nobody-else")  # the replica's own key, deleted by its own later claims or by the launcher
    withdraw_drain([APP])
    assert not exists("nobody-else")


def post_then_leave(url: str, path: str, body: Any, headers: dict[str, str], until: Callable[[], bool]) -> None:
    """POST `body` on a connection of its own, wait until `until()`, then close it unanswered."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=HANG_S) as sock:
        sock.sendall(post_head(url, path, len(payload), headers) + payload)
        wait_for(until, HANG_S, f"{path} under way")


def test_a_request_past_its_deadline_is_answered_and_counted_once_by_its_replica(cluster: LocalRay,
                                                                                   bert_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """The ingress gave up at the deadline (504, counted `error`) and withdrew the call, which the replica then
    counted `cancelled`: two counts, in two series, for one request. The replica now stops at the deadline
    itself and answers the 504, counted there alone. Redeploys (the next test redeploys again)."""
    config = gated(app_config(bert_dir, replicas=1, RERANKER_LOG_SAMPLE_RATE="1"), tmp_path)
    config["applications"][0]["args"]["deadline_s"] = 2
    redeploy_one_replica(config, "the application with a 2 s deadline")
    with device_held(tmp_path):  # its pairs cannot be scored before the deadline, on any machine
        answer = httpx.post(f"{cluster.url}/v1/rerank", json={"query": "late", "documents": ["a", "b", "c"]},
                            headers={**HEADERS, "x-request-id": "late"}, timeout=HANG_S)
    assert answer.status_code == 504 and answer.json()["error"]["type"] == "timeout", answer.text
    assert "deadline passed before all its pairs were scored" in answer.json()["error"]["message"]  # the replica's
    wait_for(lambda: request_lines(cluster, "late"), HANG_S, "the request line")
    time.sleep(1.0)  # a second line, were there one, would be written by now
    (line,) = request_lines(cluster, "late")
    assert line["message"] in ("rerank", "slow rerank") and (line["status"], line["http_status"]) == ("error", 504)


def test_a_callers_trace_continues_into_the_replica(cluster: LocalRay, bert_dir: Path) -> None:
    """A `traceparent` sent to the ingress: its server span is the caller's child, and the model replica's
    reranker.rerank span (another process, reached over the DeploymentHandle) is in the same trace, below it.
    Redeploys both deployments with an OTLP endpoint in their environment (the next test replaces them)."""
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    with otlp_receiver() as (endpoint, received):
        config = app_config(bert_dir)
        tracing = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
        for deployment in config["applications"][0]["deployments"]:
            deployment["ray_actor_options"]["runtime_env"] = {"env_vars": tracing}
        before = app_pids()
        deploy(config, APP)
        wait_for(lambda: running_replicas(APP, MODEL) == 2 and running_replicas(APP, "Ingress") == 1
                 and len(set(replica_pids(APP, MODEL)) - before) == 2
                 and len(set(replica_pids(APP, "Ingress")) - before) == 1, 120, "replicas with tracing on")
        answer = httpx.post(f"{cluster.url}/v1/rerank", json={"query": "q", "documents": ["a", "b"]},
                            headers={**HEADERS, "traceparent": f"00-{trace_id}-{caller_span}-01"}, timeout=60)
        assert answer.status_code == 200, answer.text
        received.wait_for({"POST /v1/rerank", spans.REQUEST, spans.SCORE})
    traced = {span.span_id.hex(): span for _, _, span in received.spans() if span.trace_id.hex() == trace_id}
    (server,) = [span for span in traced.values() if span.name == "POST /v1/rerank"]
    (request,) = [span for span in traced.values() if span.name == spans.REQUEST]
    assert server.parent_span_id.hex() == caller_span
    ancestors = []
    span = request
    while span.parent_span_id.hex() in traced:
        span = traced[span.parent_span_id.hex()]
        ancestors.append(span.name)
    assert "POST /v1/rerank" in ancestors, ancestors
    assert any(s.name == spans.SCORE for s in traced.values())  # the replica's batch ran in the same trace


def test_rolling_update_under_load_loses_nothing(cluster: LocalRay, bert_dir: Path) -> None:
    """A new `args.env` updates every replica of the application, the ingress's too (its new one starts before the
    old one stops: max_surge_percent, so requests do not wait at the proxy while none runs)."""
    before = app_pids()
    load = Load(cluster.url, clients=4, seed=3).start()
    try:
        wait_for(lambda: load.total >= 20, HANG_S, "load running")
        updated = copy.deepcopy(app_config(bert_dir, RERANKER_LOG_SAMPLE_RATE="0.5"))
        deploy(updated, APP)
        wait_for(lambda: running_replicas(APP, MODEL) == 2 and running_replicas(APP, "Ingress") == 1
                 and not app_pids() & before, 120,
                 "two new model replicas and a new ingress")
        served = load.total
        wait_for(lambda: load.total >= served + 20, HANG_S, "load served by the new replicas")
    finally:
        load.stop()
    print(f"rolling update: {load.total} requests, the slowest {load.slowest_s:.1f} s")
    assert load.failures == {}, load.failures


def test_autoscaling_up_under_load_and_down_when_idle(cluster: LocalRay, bert_dir: Path) -> None:
    config = app_config(bert_dir)
    model = config["applications"][0]["deployments"][0]
    del model["num_replicas"]
    model["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
                                   "target_ongoing_requests": 1,
                                   "look_back_period_s": 12, "upscale_delay_s": 1, "downscale_delay_s": 3}
    deploy(config, APP)
    wait_for(lambda: running_replicas(APP, MODEL) == 1, 120, "down to the one initial replica")
    load = Load(cluster.url, clients=6, seed=4).start()
    try:
        up = wait_for(lambda: running_replicas(APP, MODEL) == 2, 120, "a second replica under load")
    finally:
        load.stop()
    down = wait_for(lambda: running_replicas(APP, MODEL) == 1, 120, "back to one replica when idle")
    print(f"autoscaling: up in {up:.1f} s under load, down in {down:.1f} s idle")
    assert load.failures == {}, load.failures
