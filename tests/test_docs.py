"""The docs keep up with the code: docs/configuration.md's table lists exactly the variables Settings reads,
with their true defaults, and every RERANKER_* name in the docs, the README and start.sh is a real one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from reranker import Settings
from reranker.settings import variables_read

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = ROOT / "docs" / "configuration.md"
TABLE_HEADING = "## Service settings"
# A whole variable name: not the tail of another identifier, no trailing underscore (`RERANKER_*` is no name).
NAME = re.compile(r"(?<![A-Za-z0-9_])RERANKER_[A-Z0-9]+(?:_[A-Z0-9]+)*")


def settings_variables() -> set[str]:
    """The RERANKER_* variables Settings.from_env looks up (it looks every one up, set or not)."""
    return {name for name in variables_read() if NAME.fullmatch(name)}


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the table that follows `heading`, header and separator rows left out."""
    lines = markdown.splitlines()
    assert heading in lines, f"docs/configuration.md has no {heading!r} section"
    rows: list[list[str]] = []
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("#") or (rows and not line.startswith("|")):
            break  # the next section, or the end of the table
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(rows) > 2, f"no table under {heading!r}"
    assert rows[0][:2] == ["variable", "default"], rows[0]
    return rows[2:]


def documented() -> dict[str, str]:
    """Variable -> its default cell, from the configuration table; one variable per row, each row once."""
    out: dict[str, str] = {}
    for row in table_rows(CONFIGURATION.read_text(encoding="utf-8"), TABLE_HEADING):
        match = re.fullmatch(r"`(RERANKER_[A-Z0-9_]+)`", row[0])
        assert match, f"a row of the configuration table must name one variable in backticks: {row[0]!r}"
        assert match[1] not in out, f"{match[1]} has two rows in the configuration table"
        out[match[1]] = row[1]
    return out


def test_settings_reads_every_variable_named_in_its_source() -> None:
    """The recorded look-ups are the whole story: no variable is read only on some path."""
    tree = ast.parse((ROOT / "reranker" / "settings.py").read_text(encoding="utf-8"))
    literals = {node.value for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and NAME.fullmatch(node.value)}
    assert "RERANKER_MODEL" in literals
    assert literals == settings_variables()


def test_configuration_table_lists_every_variable_settings_reads() -> None:
    missing = settings_variables() - documented().keys()
    assert not missing, f"Settings reads these, add a row for each to docs/configuration.md: {sorted(missing)}"


def test_configuration_table_lists_nothing_settings_does_not_read() -> None:
    extra = documented().keys() - settings_variables()
    assert not extra, f"docs/configuration.md lists variables Settings never reads: {sorted(extra)}"


def test_documented_defaults_are_the_defaults() -> None:
    """A default written as a literal (`1024`, `auto`) is what Settings does when the variable is unset."""
    defaults = Settings.from_env({})
    checked = 0
    for name, cell in documented().items():
        literal = re.match(r"`([^`]+)`", cell)
        if literal is None:  # "unset", "unset (off)": nothing to set
            continue
        assert Settings.from_env({name: literal[1]}) == defaults, f"{name}'s documented default {cell!r} is wrong"
        checked += 1
    assert checked > 10


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def tool_variables() -> set[str]:
    """Variables read by the benchmarks (and the GPU tests that share their model) and by the Ray Serve launcher
    (deploy/ray/__main__.py: RERANKER_RAY_METRICS_PORT), not by Settings."""
    files = [*(ROOT / "bench").rglob("*.py"), *(ROOT / "bench").rglob("*.sh"), *(ROOT / "deploy").rglob("*.py")]
    return {name for path in files for name in NAME.findall(path.read_text(encoding="utf-8"))}


@pytest.mark.parametrize("path", doc_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_variable_the_docs_mention_exists(path: Path) -> None:
    """Catches typos and variables that were renamed or removed."""
    known = settings_variables() | tool_variables()
    unknown = sorted(set(NAME.findall(path.read_text(encoding="utf-8"))) - known)
    assert not unknown, f"{path.relative_to(ROOT)} mentions variables nothing reads: {unknown}"


def test_start_sh_defaults_are_settings_variables_with_the_same_defaults() -> None:
    script = (ROOT / "start.sh").read_text(encoding="utf-8")
    names = set(NAME.findall(script))
    assert names, "start.sh names no RERANKER_* variable"
    assert names <= settings_variables(), f"start.sh uses variables Settings never reads: {sorted(names)}"
    defaults = Settings.from_env({})
    # `${RERANKER_X:-value}` (shown in a message) and `: "${RERANKER_X:=value}"` (exported) must not disagree
    # with what the service does when the variable is unset.
    for name, value in re.findall(r"\$\{(RERANKER_[A-Z0-9_]+):[-=]([^}]*)\}", script):
        assert Settings.from_env({name: value}) == defaults, f"start.sh's default {name}={value} is not Settings'"


def test_every_variable_read_outside_settings_has_a_row_too() -> None:
    """The launcher's and the benchmarks' own RERANKER_* variables are in configuration.md's tables as well."""
    rows = set(re.findall(r"^\| `(RERANKER_[A-Z0-9_]+)` \|", CONFIGURATION.read_text(encoding="utf-8"), re.M))
    missing = tool_variables() - settings_variables() - rows
    assert not missing, f"add a row for each to docs/configuration.md: {sorted(missing)}"


# Other software's variables our code and scripts read or set for the service (string literals in the code; `${X}` in
# the scripts). Not those bench/peers.py sets only for a peer's own process (Infinity's cache and offline switches).
FOREIGN = re.compile(r"""["'](OTEL|RAY|HF|GRADIO|TOKENIZERS|OMP|PROMETHEUS|MKL|KMP|CUDA|PYTORCH|TORCH|TRANSFORMERS)"""
                     r"""_[A-Z0-9_]+["']""")
SHELL_NAME = re.compile(r"\$\{?([A-Z][A-Z0-9_]+)")
PEER_ONLY = {"HF_HOME", "TRANSFORMERS_OFFLINE"}
SHELL_OWN = {"PIPESTATUS", "PWD"}


def test_every_variable_the_code_or_scripts_read_is_in_the_configuration_tables() -> None:
    """OMP_NUM_THREADS, OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, RAY_AUTH_TOKEN and gpu_run.sh's BENCH_ARGS and OUT were
    read or set by the code and named in no table: the check above looked at RERANKER_* names alone."""
    code = [ROOT / "app.py", ROOT / "metrics_server.py",
            *(path for folder in ("reranker", "web", "deploy", "bench") for path in (ROOT / folder).rglob("*.py"))]
    names = {match.strip("\"'") for path in code for match in
             (m.group(0) for m in FOREIGN.finditer(path.read_text(encoding="utf-8")))} - PEER_ONLY
    scripts = [ROOT / "start.sh", ROOT / "test.sh", ROOT / ".ci" / "run", *(ROOT / "bench").glob("*.sh")]
    names |= {name for path in scripts for name in SHELL_NAME.findall(path.read_text(encoding="utf-8"))} - SHELL_OWN
    rows = "\n".join(line for line in CONFIGURATION.read_text(encoding="utf-8").splitlines() if line.startswith("|"))
    missing = sorted(name for name in names if f"`{name}`" not in rows)
    assert "OMP_NUM_THREADS" in names and "BENCH_ARGS" in names  # the scan finds what it is for
    assert not missing, f"add a row for each to docs/configuration.md: {missing}"
