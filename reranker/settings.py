"""Service configuration: one frozen dataclass read once from the environment."""

from __future__ import annotations

import math
import os
import pwd
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from reranker import values
from reranker.ui_auth import login_pairs
from reranker.values import SettingsError

T = TypeVar("T")

DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")
BACKENDS = ("auto", "torch", "openvino")
INT8_MODES = ("static", "weights")
INT8_ON_FAIL = ("fallback", "exit")
LONG_DOC_MODES = ("truncate", "chunk")
COMPILE_MODES = ("off", "on", "cudagraphs")
# The OTLP transports the Python SDK ships; http/json has no Python exporter.
OTLP_PROTOCOLS = ("http/protobuf", "grpc")
# Setting either of these asks for traces (the OpenTelemetry convention), even without RERANKER_TRACING.
OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# The samplers the SDK builds from OTEL_TRACES_SAMPLER (opentelemetry.sdk.trace.sampling); it takes no other name.
OTEL_SAMPLERS = ("parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio", "always_on",
                 "always_off", "traceidratio")
MAX_QUERY_CHARS = 10_000
# Where a value of spaces only is an error, not unset: a secret that was meant to be set would leave its route open.
SECRETS = ("RERANKER_API_KEY", "RERANKER_UI_AUTH")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service can be configured with; see the README's table."""

    model: str = "BAAI/bge-reranker-v2-m3"
    device: str = "auto"
    dtype: str = "auto"
    compile: str = "off"
    backend: str = "auto"
    cache_dir: str | None = None  # None: default_cache_dir(), resolved only where a converted model is kept
    cache_max_age_days: float = 30.0  # converted models unused this long are removed when one is added; 0: never
    int8_mode: str = "static"
    int8_calibration: str | None = None  # a JSONL file of {"query", "document"} lines; None: the built-in set
    int8_min_spearman: float = 0.99
    int8_on_fail: str = "fallback"
    cpu_streams: int | None = None  # OpenVINO streams; None: auto (two where there are two threads or more)
    max_length: int = 1024
    long_docs: str = "truncate"
    batch_tokens: int | None = None  # None: auto, by device (see reranker.budgets)
    cache_size: int = 10_000
    max_docs: int = 1000
    max_doc_chars: int = 100_000
    max_query_chars: int = MAX_QUERY_CHARS
    max_queue: int = 20_000
    max_body_bytes: int = 64 * 1024 * 1024
    body_timeout_seconds: float = 60.0  # a request body must arrive within this of its headers; 0: no limit
    trust_remote_code: bool = False
    host: str = "127.0.0.1"
    port: int = 7860
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9091
    log_level: str = "INFO"
    log_sample_rate: float = 0.1
    slow_ms: float = 2000.0
    log_query_preview: int = 0
    drain_seconds: float = 30.0
    stall_seconds: float | None = None  # None: auto, by device (see reranker.budgets); 0: never
    cut_ins: bool = True  # a smaller request cuts in between the batches of a round in progress (reranker.batcher)
    # Above the idle timeout of the clients and load balancers in front (httpx 5 s, AWS ALB 60 s): the side that
    # closes an idle connection first must be the client, or a request sent as the server closes it is reset.
    keep_alive_seconds: int = 75
    api_key: str | None = field(default=None, repr=False)  # secrets stay out of reprs and logs
    ui_auth: tuple[tuple[str, str], ...] | None = field(default=None, repr=False)  # (user, password) pairs
    ui_login_attempts: int = 10  # failed UI logins an address may make in a minute before 429; 0: no limit
    tracing: bool = False
    tracing_protocol: str = "http/protobuf"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``RERANKER_*`` variables; a bad value raises SettingsError naming it."""
        env = os.environ if environ is None else environ

        def get(name: str, parse: Callable[[str, str], T], default: T) -> T:
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                if raw and name in SECRETS:  # spaces only: a secret that was meant to be set, not left out
                    raise SettingsError(f"{name} is only whitespace, which would leave what it guards open; set "
                                        "it, or leave it empty to go without")
                return default
            return parse(name, raw.strip())

        d = cls()
        dtype = get("RERANKER_DTYPE", values.choice(DTYPES), d.dtype)
        int8_mode = get("RERANKER_INT8_MODE", values.choice(INT8_MODES), d.int8_mode)
        # Only static int8 reads the calibration file: checked here, before minutes of loading and converting.
        static_int8 = dtype == "int8" and int8_mode == "static"
        tracing, tracing_protocol = _tracing(env, get("RERANKER_TRACING", values.boolean, None), d.tracing_protocol)
        return cls(
            model=get("RERANKER_MODEL", values.model_id, d.model),
            device=get("RERANKER_DEVICE", values.device, d.device),
            dtype=dtype,
            compile=get("RERANKER_COMPILE", values.choice(COMPILE_MODES), d.compile),
            backend=get("RERANKER_BACKEND", values.choice(BACKENDS), d.backend),
            cache_dir=get("RERANKER_CACHE_DIR", values.path, d.cache_dir),
            cache_max_age_days=get("RERANKER_CACHE_MAX_AGE_DAYS", values.non_negative, d.cache_max_age_days),
            int8_mode=int8_mode,
            int8_calibration=get("RERANKER_INT8_CALIBRATION", values.calibration if static_int8 else values.text, None),
            int8_min_spearman=get("RERANKER_INT8_MIN_SPEARMAN", values.bounded(-1.0, 1.0, "a number from -1 to 1"),
                                  d.int8_min_spearman),
            int8_on_fail=get("RERANKER_INT8_ON_FAIL", values.choice(INT8_ON_FAIL), d.int8_on_fail),
            cpu_streams=get("RERANKER_CPU_STREAMS", values.auto_or(values.integer(1)), d.cpu_streams),
            max_length=get("RERANKER_MAX_LENGTH", values.integer(16), d.max_length),
            long_docs=get("RERANKER_LONG_DOCS", values.choice(LONG_DOC_MODES), d.long_docs),
            batch_tokens=get("RERANKER_BATCH_TOKENS", values.auto_or(values.integer(1)), d.batch_tokens),
            cache_size=get("RERANKER_CACHE_SIZE", values.integer(0), d.cache_size),
            max_docs=get("RERANKER_MAX_DOCS", values.integer(1), d.max_docs),
            max_doc_chars=get("RERANKER_MAX_DOC_CHARS", values.integer(1), d.max_doc_chars),
            max_query_chars=get("RERANKER_MAX_QUERY_CHARS", values.integer(1), d.max_query_chars),
            max_queue=get("RERANKER_MAX_QUEUE", values.integer(1), d.max_queue),
            max_body_bytes=get("RERANKER_MAX_BODY_BYTES", values.integer(1024), d.max_body_bytes),
            body_timeout_seconds=get("RERANKER_BODY_TIMEOUT_SECONDS", values.non_negative, d.body_timeout_seconds),
            trust_remote_code=get("RERANKER_TRUST_REMOTE_CODE", values.boolean, d.trust_remote_code),
            host=get("RERANKER_HOST", values.text, d.host),
            port=get("RERANKER_PORT", values.port, d.port),
            metrics_host=get("RERANKER_METRICS_HOST", values.text, d.metrics_host),
            metrics_port=get("RERANKER_METRICS_PORT", values.port, d.metrics_port),
            log_level=get("RERANKER_LOG_LEVEL", values.log_level, d.log_level),
            log_sample_rate=get("RERANKER_LOG_SAMPLE_RATE", values.ratio, d.log_sample_rate),
            slow_ms=get("RERANKER_SLOW_MS", values.non_negative, d.slow_ms),
            log_query_preview=get("RERANKER_LOG_QUERY_PREVIEW", values.integer(0), d.log_query_preview),
            api_key=get("RERANKER_API_KEY", values.text, None),
            drain_seconds=get("RERANKER_DRAIN_SECONDS", values.non_negative, d.drain_seconds),
            stall_seconds=get("RERANKER_STALL_SECONDS", values.auto_or(values.off_or_at_least(1.0)), d.stall_seconds),
            cut_ins=get("RERANKER_CUT_INS", values.boolean, d.cut_ins),
            keep_alive_seconds=get("RERANKER_KEEP_ALIVE_SECONDS", values.integer(1), d.keep_alive_seconds),
            ui_auth=get("RERANKER_UI_AUTH", login_pairs, None),
            ui_login_attempts=get("RERANKER_UI_LOGIN_ATTEMPTS", values.integer(0), d.ui_login_attempts),
            tracing=tracing,
            tracing_protocol=tracing_protocol,
        )


class _RecordingEnv(Mapping[str, str]):
    """An empty environment that remembers every variable looked up in it."""

    def __init__(self) -> None:
        self.looked_up: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.looked_up.add(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def variables_read() -> set[str]:
    """Every environment variable Settings.from_env looks up (it looks every one up, set or not)."""
    env = _RecordingEnv()
    Settings.from_env(env)
    return env.looked_up


def default_cache_dir(environ: Mapping[str, str] | None = None) -> str:
    """Where converted models are kept when RERANKER_CACHE_DIR is unset: $XDG_CACHE_HOME/reranker, else
    ~/.cache/reranker. Raises SettingsError when there is no home directory to put it in."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME", "").strip()
    if not base:
        home = env.get("HOME", "").strip() or _account_home()
        if not home:
            raise SettingsError(f"RERANKER_CACHE_DIR is unset and this user has no home directory to keep converted "
                                f"models in (HOME is unset and uid {os.getuid()} has no passwd entry): set "
                                "RERANKER_CACHE_DIR to a writable folder")
        base = str(Path(home) / ".cache")
    return str(Path(base) / "reranker")


def _account_home() -> str | None:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir or None
    except KeyError:  # a uid with no passwd entry: containers run as an arbitrary user
        return None


def _tracing(env: Mapping[str, str], asked: bool | None, protocol: str) -> tuple[bool, str]:
    """RERANKER_TRACING wins either way; unset, an OTLP endpoint turns tracing on. Only the switch and the
    transport are ours: the SDK reads every other OTEL_* variable itself."""
    on = asked if asked is not None else any(env.get(name, "").strip() for name in OTLP_ENDPOINTS)
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        on = False
    if not on:
        return on, protocol
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if env.get(name, "").strip():
            protocol = values.choice(OTLP_PROTOCOLS)(name, env[name].strip())
            break
    _check_otel(env, protocol)
    return on, protocol


def _check_otel(env: Mapping[str, str], protocol: str) -> None:
    """The OTEL_* values the SDK would log a warning about and replace with its default (a sampler that keeps
    every trace, a 10 s export timeout), or take and then fail every export with (an HTTP endpoint without its
    scheme, which the exporter cannot post to): a typo there should stop the start, not change or lose what is
    traced."""
    default_port = 4317 if protocol == "grpc" else 4318
    for name in OTLP_ENDPOINTS:
        raw = env.get(name, "").strip()
        if raw and not (values.is_url(raw) or protocol == "grpc" and values.is_grpc_target(raw)):
            raise SettingsError(f"{name}={raw!r} is not a valid OTLP endpoint; use a URL with its scheme, "
                                f"http:// for plain text or https:// for TLS (e.g. http://127.0.0.1:{default_port} "
                                f"for {protocol})" + (", or host:port" if protocol == "grpc" else ""))
    for name in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        raw = env.get(name, "").strip()
        if raw and not 0 < values.number(raw) < math.inf:
            raise SettingsError(f"{name}={raw!r} is not valid; use the export timeout in seconds, a number "
                                "above 0 (e.g. 10)")
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip()
    if sampler and sampler.lower() not in OTEL_SAMPLERS:
        raise SettingsError(f"OTEL_TRACES_SAMPLER={sampler!r} is not valid; use one of: {', '.join(OTEL_SAMPLERS)}")
    sampler_arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()  # unset: 1.0
    if sampler_arg and sampler.lower().endswith("traceidratio") and not 0 <= values.number(sampler_arg) <= 1:
        raise SettingsError(f"OTEL_TRACES_SAMPLER_ARG={sampler_arg!r} is not valid for {sampler}: use the share of new "
                            "traces to keep, a number from 0 to 1 (e.g. 0.1)")


