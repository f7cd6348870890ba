"""bench/gpu_serve.py (Ray Serve on a GPU) and bench/gpu_rehearse.py cannot be measured here, but their code runs: a
smoke run of the Serve bench on the CPU, its no-CUDA exit, and the rehearsal's view of a bare GPU host."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="needs requirements-ray.txt")

import torch  # noqa: E402

from bench.gpu_rehearse import carried_modules, host_modules  # noqa: E402
from tests.ray_cluster import descendants  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_serve_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.gpu_serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: bench/gpu_serve.py would run for real")
def test_gpu_serve_bench_says_it_needs_cuda() -> None:
    result = run_serve_bench()
    assert result.returncode == 1
    assert "needs a CUDA GPU" in result.stderr and "--smoke" in result.stderr


def test_gpu_serve_smoke_run_measures_each_configuration_and_a_replica_kill_and_leaves_no_ray() -> None:
    before = descendants(os.getpid())
    result = run_serve_bench("--smoke", "--requests", "12")
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    for name in ("engine", "serve-1", "serve-2", "kill"):
        assert re.search(rf"^{name} +\d+ pairs/s .* statuses \{{200: 12\}}$", out, re.MULTILINE), out
    # Every configuration is compared with the engine's scores, and two replicas both answered.
    assert len(re.findall(r"vs engine: max \|delta\| \d\.\d\de[-+]\d+, top-10 order equal in 12/12", out)) == 4
    serve_2 = re.search(r"^serve-2 .*\n +replicas \{(.*)\};", out, re.MULTILINE)
    assert serve_2 is not None and serve_2.group(1).count(":") == 2, out
    assert re.search(r"SIGKILLed a quarter into the load: statuses \{200: 12\}, two replicas running again", out)
    assert "reranker_queue_capacity_pairs exported by 2 of serve-2's replicas" in out  # the GPU gauges' check
    assert "every check passed" in out
    assert descendants(os.getpid()) <= before  # the bench's Ray was stopped with it


def test_the_rehearsal_reads_the_top_level_modules_of_either_staged_form(tmp_path: Path) -> None:
    packed = tmp_path / "serve"
    packed.mkdir()
    with tarfile.open(packed / "site.tar.xz", "w:xz") as tar:
        for name in ("./ray/__init__.py", "./six.py", "./_brotli.cpython-312-x86_64-linux-gnu.so",
                     "./ray-2.60.0.dist-info/METADATA"):
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    assert carried_modules(packed) == {"ray", "six", "_brotli"}

    wheels = tmp_path / "engine"
    (wheels / "whl").mkdir(parents=True)
    with zipfile.ZipFile(wheels / "whl" / "transformers-5.23.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("transformers/__init__.py", "")
        wheel.writestr("transformers-5.23.0.dist-info/METADATA", "")
    assert carried_modules(wheels) == {"transformers"}


def test_the_rehearsal_takes_the_hosts_packages_with_their_dependencies_and_not_what_it_lacks() -> None:
    host = host_modules()
    assert {"torch", "numpy", "transformers", "sentence_transformers", "sklearn", "yaml", "pynvml"} <= host
    assert not {"ray", "fastapi", "gradio", "uvicorn", "openvino"} & host
