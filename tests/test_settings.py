"""Settings.from_env: defaults, parsing, and errors that name the variable and the accepted values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reranker import Settings, SettingsError


def test_defaults_match_the_spec() -> None:
    s = Settings.from_env({})
    assert s.model == "BAAI/bge-reranker-v2-m3"
    assert (s.device, s.dtype, s.max_length, s.long_docs) == ("auto", "auto", 1024, "truncate")
    assert (s.batch_tokens, s.cache_size, s.max_docs) == (None, 10000, 1000)  # batch tokens: auto
    assert (s.max_doc_chars, s.max_query_chars, s.max_queue) == (100000, 10000, 20000)
    assert (s.host, s.port, s.metrics_host, s.metrics_port) == ("127.0.0.1", 7860, "127.0.0.1", 9091)
    assert (s.log_level, s.log_sample_rate, s.slow_ms, s.log_query_preview) == ("INFO", 0.1, 2000.0, 0)
    assert s.trust_remote_code is False and s.api_key is None and s.ui_auth is None
    assert s.tracing is False and s.tracing_protocol == "http/protobuf"


def test_every_variable_is_read() -> None:
    environ = {
        "RERANKER_MODEL": "/models/x", "RERANKER_DEVICE": "cuda:1", "RERANKER_DTYPE": "BFloat16",
        "RERANKER_COMPILE": "CUDAGraphs", "RERANKER_MAX_LENGTH": "512", "RERANKER_LONG_DOCS": "chunk",
        "RERANKER_BATCH_TOKENS": "4096", "RERANKER_CPU_STREAMS": "1", "RERANKER_CACHE_MAX_AGE_DAYS": "7.5",
        "RERANKER_CACHE_SIZE": "0", "RERANKER_MAX_DOCS": "10", "RERANKER_MAX_DOC_CHARS": "99",
        "RERANKER_MAX_QUEUE": "7", "RERANKER_MAX_QUERY_CHARS": "300",
        "RERANKER_TRUST_REMOTE_CODE": "yes", "RERANKER_HOST": "0.0.0.0",
        "RERANKER_PORT": "8000", "RERANKER_METRICS_HOST": "0.0.0.0", "RERANKER_METRICS_PORT": "9100",
        "RERANKER_LOG_LEVEL": "debug", "RERANKER_LOG_SAMPLE_RATE": "1", "RERANKER_SLOW_MS": "250.5",
        "RERANKER_LOG_QUERY_PREVIEW": "40", "RERANKER_API_KEY": "secret", "RERANKER_UI_AUTH": "alice:pw",
        "RERANKER_TRACING": "on", "RERANKER_BACKEND": "OpenVINO", "RERANKER_CACHE_DIR": "/var/cache/rr",
        "RERANKER_DRAIN_SECONDS": "12.5", "RERANKER_INT8_CALIBRATION": "/data/pairs.jsonl",
        "RERANKER_INT8_MIN_SPEARMAN": "0.95", "RERANKER_INT8_MODE": "weights", "RERANKER_INT8_ON_FAIL": "exit",
        "RERANKER_KEEP_ALIVE_SECONDS": "620", "RERANKER_MAX_BODY_BYTES": "2048",
        "RERANKER_BODY_TIMEOUT_SECONDS": "2.5", "RERANKER_UI_LOGIN_ATTEMPTS": "0", "RERANKER_STALL_SECONDS": "45",
        "RERANKER_CUT_INS": "off",
    }
    # The dict above names every variable Settings.from_env reads.
    source = Path(__file__).resolve().parent.parent.joinpath("reranker", "settings.py").read_text()
    assert set(re.findall(r'get\("(RERANKER_\w+)"', source)) == set(environ)
    s = Settings.from_env(environ)
    assert s == Settings(
        model="/models/x", device="cuda:1", dtype="bfloat16", compile="cudagraphs", max_length=512, long_docs="chunk",
        batch_tokens=4096, cpu_streams=1, cache_max_age_days=7.5,
        cache_size=0, max_docs=10, max_doc_chars=99, max_query_chars=300, max_queue=7, trust_remote_code=True,
        host="0.0.0.0",
        port=8000, metrics_host="0.0.0.0", metrics_port=9100, log_level="DEBUG", log_sample_rate=1.0,
        slow_ms=250.5, log_query_preview=40, api_key="secret", ui_auth=(("alice", "pw"),), tracing=True,
        backend="openvino", cache_dir="/var/cache/rr", drain_seconds=12.5, int8_calibration="/data/pairs.jsonl",
        int8_min_spearman=0.95, int8_mode="weights", int8_on_fail="exit", keep_alive_seconds=620,
        max_body_bytes=2048, body_timeout_seconds=2.5, ui_login_attempts=0, stall_seconds=45.0,
        cut_ins=False,
    )


def test_batch_tokens_auto_is_resolved_by_device() -> None:
    from reranker.budgets import batch_token_budget

    assert Settings.from_env({"RERANKER_BATCH_TOKENS": "AUTO"}).batch_tokens is None
    assert Settings.from_env({"RERANKER_CPU_STREAMS": "auto"}).cpu_streams is None
    assert Settings.from_env({"RERANKER_STALL_SECONDS": "Auto"}).stall_seconds is None
    assert Settings.from_env({"RERANKER_STALL_SECONDS": "0"}).stall_seconds == 0.0
    assert batch_token_budget("cuda:0") == 16384 and batch_token_budget("cpu") == 2048
    # OpenVINO: 1024 tokens per thread of a stream, at most 2048
    assert [batch_token_budget("cpu", threads) for threads in (1, 2, 8)] == [1024, 2048, 2048]
    assert batch_token_budget("cuda:0", 1) == 16384


def test_a_model_directory_under_home_is_expanded_as_the_cache_folder_is() -> None:
    home = Path.home()
    assert Settings.from_env({"RERANKER_MODEL": "~/models/reranker"}).model == str(home / "models" / "reranker")
    assert Settings.from_env({"RERANKER_MODEL": "BAAI/bge-reranker-v2-m3"}).model == "BAAI/bge-reranker-v2-m3"


def test_blank_values_fall_back_to_defaults() -> None:
    assert Settings.from_env({"RERANKER_PORT": " ", "RERANKER_API_KEY": "", "RERANKER_UI_AUTH": ""}) == Settings()


@pytest.mark.parametrize("name", ["RERANKER_API_KEY", "RERANKER_UI_AUTH"])
def test_a_secret_of_spaces_only_is_refused_not_taken_as_unset(name: str) -> None:
    """A key meant to be set (a secret mounted empty, a stray space in a compose file) left the JSON routes open,
    without a word; empty is still unset."""
    with pytest.raises(SettingsError, match=f"{name} is only whitespace, which would leave what it guards open"):
        Settings.from_env({name: "  \t"})


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("RERANKER_DEVICE", "gpu", "auto, cpu, cuda, cuda:N"),
        ("RERANKER_DEVICE", "cuda:x", "cuda:N"),
        ("RERANKER_DEVICE", "cuda:\u00b2", "cuda:N"),
        ("RERANKER_DTYPE", "fp16", "auto, float32, float16, bfloat16"),
        ("RERANKER_LONG_DOCS", "split", "truncate, chunk"),
        ("RERANKER_COMPILE", "yes", "off, on, cudagraphs"),
        ("RERANKER_MAX_LENGTH", "abc", "an integer >= 16"),
        ("RERANKER_MAX_LENGTH", "8", "an integer >= 16"),
        ("RERANKER_BATCH_TOKENS", "0", "an integer >= 1 or auto"),
        ("RERANKER_BATCH_TOKENS", "lots", "an integer >= 1 or auto"),
        ("RERANKER_CPU_STREAMS", "0", "an integer >= 1 or auto"),
        ("RERANKER_CPU_STREAMS", "\u0663", "an integer >= 1 or auto"),  # an Arabic-Indic 3, which int() takes
        ("RERANKER_CACHE_SIZE", "-1", "an integer >= 0"),
        ("RERANKER_MAX_DOCS", "1.5", "an integer >= 1"),
        ("RERANKER_MAX_QUEUE", "0", "an integer >= 1"),
        ("RERANKER_PORT", "70000", "0 to 65535"),
        ("RERANKER_METRICS_PORT", "x", "a port number from 0 to 65535"),
        ("RERANKER_PORT", "-1", "a port number from 0 to 65535"),
        ("RERANKER_TRUST_REMOTE_CODE", "maybe", "true, false"),
        ("RERANKER_LOG_LEVEL", "LOUD", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("RERANKER_LOG_SAMPLE_RATE", "1.5", "from 0 to 1"),
        ("RERANKER_LOG_SAMPLE_RATE", "nan", "from 0 to 1"),
        ("RERANKER_SLOW_MS", "-3", "a number >= 0"),
        ("RERANKER_CACHE_MAX_AGE_DAYS", "-1", "a number >= 0"),
        ("RERANKER_LOG_QUERY_PREVIEW", "-1", "an integer >= 0"),
        ("RERANKER_TRACING", "sometimes", "true, false"),
        ("RERANKER_BACKEND", "onnx", "auto, torch, openvino"),
        ("RERANKER_DRAIN_SECONDS", "-1", "a number >= 0"),
        ("RERANKER_STALL_SECONDS", "-5", "0 (off) or a number of seconds >= 1 or auto"),
        ("RERANKER_STALL_SECONDS", "never", "0 (off) or a number of seconds >= 1 or auto"),
        ("RERANKER_STALL_SECONDS", "0.001", "0 (off) or a number of seconds >= 1 or auto"),  # the first pass killed it
        ("RERANKER_STALL_SECONDS", "inf", "0 (off) or a number of seconds >= 1 or auto"),
        ("RERANKER_INT8_MODE", "dynamic", "static, weights"),
        ("RERANKER_INT8_MIN_SPEARMAN", "1.5", "a number from -1 to 1"),
        ("RERANKER_INT8_ON_FAIL", "crash", "fallback, exit"),
        ("RERANKER_KEEP_ALIVE_SECONDS", "0", "an integer >= 1"),
        ("RERANKER_KEEP_ALIVE_SECONDS", "2.5", "an integer >= 1"),
        ("RERANKER_MAX_BODY_BYTES", "100", "an integer >= 1024"),
        ("RERANKER_BODY_TIMEOUT_SECONDS", "-1", "a number >= 0"),
        ("RERANKER_UI_LOGIN_ATTEMPTS", "many", "an integer >= 0"),
    ],
)
def test_bad_value_names_variable_and_accepted_values(name: str, value: str, accepted: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    assert name in str(info.value) and repr(value) in str(info.value) and accepted in str(info.value)


def test_settings_are_frozen_and_keyword_only() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Settings("model")  # type: ignore[call-arg]


UI_AUTH_ACCEPTED = "use user:password, several pairs separated by commas, or the path of a file"


def test_ui_auth_pairs() -> None:
    s = Settings.from_env({"RERANKER_UI_AUTH": " alice:s3cret , bob:p:a/ss=word "})
    # Split at the first ':' only, so a password may hold ':' and '/'.
    assert s.ui_auth == (("alice", "s3cret"), ("bob", "p:a/ss=word"))


def test_ui_auth_file(tmp_path: Path) -> None:
    users = tmp_path / "ui-users"
    users.write_text("# operators\n\nalice:s3cret, with a comma\n  bob:b:pw  \n# carol:old\n", encoding="utf-8")
    assert Settings.from_env({"RERANKER_UI_AUTH": str(users)}).ui_auth == (
        ("alice", "s3cret, with a comma"), ("bob", "b:pw"))


def test_secrets_stay_out_of_the_settings_repr() -> None:
    s = Settings.from_env({"RERANKER_UI_AUTH": "alice:s3cret", "RERANKER_API_KEY": "k3y"})
    assert "s3cret" not in repr(s) and "k3y" not in repr(s)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("alices3cret", "cannot be read as a file"),  # no ':' at all: read as a file name, not repeated
        ("alice:", "non-empty password"),
        (":s3cret", "needs a user name"),
        ("alice:s3cret,", "pair 2 is empty"),
        ("alice:s3cret,,bob:s3cret", "pair 2 is empty"),
        ("alice:s3cret,bob", "pair 2 needs a user name"),
        ("al ice:s3cret", "space in the user name"),
        ("alice: s3cret", "starts or ends with a space"),
        ("alice:s3cret,alice:other", "user 'alice' is listed twice"),
    ],
)
def test_bad_ui_auth_names_the_problem_never_the_password(value: str, problem: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"RERANKER_UI_AUTH": value})
    message = str(info.value)
    assert "RERANKER_UI_AUTH" in message and problem in message and UI_AUTH_ACCEPTED in message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "No such file or directory"),
        ("", "has no user:password line"),
        ("# only a comment\n\n", "has no user:password line"),
        ("alice:s3cret\nbob s3cret\n", "line 2 needs a user name"),
        ("alice:s3cret\n\n# x\nalice:s3cret2\n", "user 'alice' is listed twice"),
        (b"alice:s3cret\xff\n", "not a readable UTF-8 file"),
    ],
)
def test_bad_ui_auth_file(tmp_path: Path, content: str | bytes | None, problem: str) -> None:
    path = tmp_path / "ui-users"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"RERANKER_UI_AUTH": str(path)})
    message = str(info.value)
    assert "RERANKER_UI_AUTH" in message and problem in message and UI_AUTH_ACCEPTED in message
    assert str(path) in message and "s3cret" not in message


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"RERANKER_TRACING": "1"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "RERANKER_TRACING": "0"}, False),
        ({"RERANKER_TRACING": "1", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_off_unless_asked_for_or_an_endpoint_is_set(environ: dict[str, str], on: bool) -> None:
    assert Settings.from_env(environ).tracing is on


def test_the_otlp_protocol_is_http_unless_grpc_is_named() -> None:
    on = {"RERANKER_TRACING": "1"}
    assert Settings.from_env(on).tracing_protocol == "http/protobuf"
    assert Settings.from_env({**on, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}).tracing_protocol == "grpc"
    both = {**on, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    assert Settings.from_env(both).tracing_protocol == "http/protobuf"  # the signal's own variable wins
    with pytest.raises(SettingsError, match=r"OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not valid; use one of: "
                                            r"http/protobuf, grpc"):
        Settings.from_env({**on, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    # With tracing off the transport is nobody's business.
    assert Settings.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}).tracing is False


@pytest.mark.parametrize(("name", "value", "message"), [
    ("OTEL_TRACES_SAMPLER", "bogus", "use one of: parentbased_always_on"),
    ("OTEL_TRACES_SAMPLER_ARG", "1.5", "a number from 0 to 1"),
    ("OTEL_TRACES_SAMPLER_ARG", "half", "a number from 0 to 1"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc", "a number above 0"),
    ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0", "a number above 0"),
])
def test_an_otel_value_the_sdk_would_replace_stops_the_start(name: str, value: str, message: str) -> None:
    """The SDK logs a warning and goes on with its default: every trace kept, a 10 s timeout."""
    on = {"RERANKER_TRACING": "1", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    assert Settings.from_env(on).tracing is True
    with pytest.raises(SettingsError, match=f"{name}=.* is not valid.*{message}"):
        Settings.from_env({**on, name: value})
    assert Settings.from_env({name: value}).tracing is False  # off: not read


@pytest.mark.parametrize("endpoint", ["collector:4318", "127.0.0.1:4318", "grpc://collector:4317",
                                      "http://", "http://collector:port", "http://collector:99999"])
@pytest.mark.parametrize("name", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
def test_an_http_otlp_endpoint_without_its_scheme_or_host_stops_the_start(name: str, endpoint: str) -> None:
    """The HTTP exporter cannot post to it: every export would fail, with a warning in the log, after a start that
    looked fine."""
    with pytest.raises(SettingsError, match=rf"{name}='{re.escape(endpoint)}' is not a valid OTLP endpoint; use a URL "
                                            r"with its scheme, http:// for plain text or https:// for TLS \(e\.g\. "
                                            r"http://127\.0\.0\.1:4318 for http/protobuf\)$"):
        Settings.from_env({name: endpoint})
    assert Settings.from_env({name: endpoint, "RERANKER_TRACING": "0"}).tracing is False  # off: not read


@pytest.mark.parametrize(("endpoint", "taken"), [
    ("collector:4317", True), ("127.0.0.1:4317", True), ("unix:///run/otel.sock", True),
    ("http://collector:4317", True),
    ("grpc://collector:4317", False), ("http://", False), ("collector:port", False), ("http://collector:99999", False),
])
def test_a_grpc_endpoint_may_be_a_target_as_grpc_writes_one(endpoint: str, taken: bool) -> None:
    """host:port is how gRPC targets are written; the exporter takes TLS or plain text from
    OTEL_EXPORTER_OTLP_INSECURE for it."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    if taken:
        assert Settings.from_env(env).tracing is True
    else:
        with pytest.raises(SettingsError, match=r"http://127\.0\.0\.1:4317 for grpc\), or host:port$"):
            Settings.from_env(env)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:4318", "https://otel.example.com", "http://[::1]:4317/",
                                      "http://collector:4318/v1/traces"])
def test_an_otlp_url_is_taken(endpoint: str) -> None:
    assert Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}).tracing is True


def test_the_samplers_named_are_the_sdks() -> None:
    from opentelemetry.sdk.trace import sampling

    from reranker.settings import OTEL_SAMPLERS

    assert set(OTEL_SAMPLERS) == set(sampling._KNOWN_SAMPLERS)


@pytest.fixture
def no_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOME unset and a uid with no passwd entry: a container run as an arbitrary user."""
    import pwd

    def no_entry(uid: int) -> None:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    for name in ("HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)


@pytest.mark.usefixtures("no_home")
def test_no_home_directory_stops_nothing_that_does_not_need_one() -> None:
    from reranker.settings import default_cache_dir

    assert Settings.from_env({"RERANKER_CACHE_DIR": "/srv/cache"}).cache_dir == "/srv/cache"
    assert Settings.from_env({}).cache_dir is None and Settings().cache_dir is None  # resolved where it is used
    with pytest.raises(SettingsError, match="RERANKER_CACHE_DIR is unset and this user has no home directory"):
        default_cache_dir({})
    with pytest.raises(SettingsError, match="RERANKER_CACHE_DIR='~/cache' is not valid: this user has no home"):
        Settings.from_env({"RERANKER_CACHE_DIR": "~/cache"})


def test_a_cache_dir_under_no_such_users_home_says_so() -> None:
    with pytest.raises(SettingsError, match="'~nosuchuser42/x' is not valid: no user 'nosuchuser42' has a home "
                                            "directory for '~nosuchuser42'"):
        Settings.from_env({"RERANKER_CACHE_DIR": "~nosuchuser42/x"})


def test_the_default_cache_dir_follows_xdg_then_home() -> None:
    from reranker.settings import default_cache_dir

    assert default_cache_dir({"HOME": "/home/ann"}) == "/home/ann/.cache/reranker"
    assert default_cache_dir({"HOME": "/home/ann", "XDG_CACHE_HOME": "/var/cache"}) == "/var/cache/reranker"


def test_a_calibration_file_that_static_int8_cannot_read_is_a_configuration_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.jsonl")
    static = {"RERANKER_DTYPE": "int8", "RERANKER_INT8_CALIBRATION": missing}
    with pytest.raises(SettingsError, match=r"RERANKER_INT8_CALIBRATION='.*missing.jsonl' cannot be read \(No such "
                                            r"file or directory\); name a UTF-8 file of JSON lines"):
        Settings.from_env(static)
    with pytest.raises(SettingsError, match="cannot be read"):
        Settings.from_env({**static, "RERANKER_INT8_CALIBRATION": str(tmp_path)})  # a folder
    # Unused, it is not read: weights-only int8 and the other precisions calibrate on nothing.
    assert Settings.from_env({**static, "RERANKER_INT8_MODE": "weights"}).int8_calibration == missing
    assert Settings.from_env({**static, "RERANKER_DTYPE": "bfloat16"}).int8_calibration == missing


def test_a_reranker_variable_nothing_reads_is_named_with_the_closest_setting() -> None:
    """RERANKER_DTYPES=bfloat16 was ignored without a word: app.py and `python -m deploy.ray` log each of these as a
    warning at start."""
    from app import unknown_variables

    env = {"RERANKER_DTYPES": "bfloat16", "RERANKER_PORT": "7860", "RERANKER_RAY_METRICS_PORT": "8080",
           "RERANKER_OTHER_THING": "1", "OTEL_SERVICE_NAME": "x"}
    assert unknown_variables(env) == [
        "RERANKER_DTYPES is not a setting of this service and is ignored; did you mean RERANKER_DTYPE? the settings "
        "are listed in docs/configuration.md",
        "RERANKER_OTHER_THING is not a setting of this service and is ignored; the settings are listed in "
        "docs/configuration.md",
    ]
    assert unknown_variables({"RERANKER_MODEL": "m", "RERANKER_TRACING": "1"}) == []
