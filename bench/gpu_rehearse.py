"""Rehearse a GPU-host run here, before spending device time on it: a part's CPU smoke run with imports limited to
what a bare GPU host has.

The lent GPU host has no network and few packages (docs/gpu.md); what it lacks travels in .gpu/
(bench/gpu_prepare.sh). A module missing from that set fails there, minutes into a 15-minute allowance (a first
Serve run on the GPU ended so, on fastapi-swagger, which the ingress reads at start). Here, a `sitecustomize` on
PYTHONPATH (so that Ray's workers and agents load it too) lets an import through only for the standard library,
the host's packages with their dependencies (as this venv's metadata names them), and the top-level modules in .gpu/;
every other import finds nothing, as on the host.

Run: .venv/bin/python -m bench.gpu_rehearse serve|engine   (after bench/gpu_prepare.sh serve|, respectively)
  serve: bench/gpu_serve.py --smoke; engine: bench/gpu.py --smoke --only bge
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The GPU host's own packages (docs/gpu.md, "A GPU host without network"); their dependencies are there too.
HOST = ["torch", "numpy", "scipy", "scikit-learn", "transformers", "sentence-transformers", "huggingface-hub",
        "tokenizers", "safetensors", "pytest", "hypothesis", "prometheus-client", "nvidia-ml-py", "pyyaml"]
PROJECT = ["app", "bench", "deploy", "reranker", "tests", "web"]
PARTS = {"serve": ["bench.gpu_serve", "--smoke"], "engine": ["bench.gpu", "--smoke", "--only", "bge", "--profile"]}

SITECUSTOMIZE = """
import importlib.machinery
import json
import sys

# The host's Python is 3.12, which no longer has these.
ALLOWED = (set(json.loads({allowed!r})) | set(sys.stdlib_module_names)) - {{"distutils", "imp", "asynchat",
                                                                            "asyncore", "smtpd"}}


# Whether `path` lies in an allowed package: Ray's agents and setuptools put folders of their own on sys.path
# (Ray's runtime_env_consts and vendored aiohttp, setuptools' _vendor/jaraco).
def inside_allowed(path):
    parts = str(path).split("/")
    if "site-packages" not in parts:
        return False
    below = parts[parts.index("site-packages") + 1:]
    return len(below) > 1 and below[0] in ALLOWED


class BareHost(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        spec = super().find_spec(name, path, target)
        top = name.split(".")[0]
        if spec is None or top in ALLOWED or top.startswith("_") or any(
                inside_allowed(p) for p in [spec.origin, *(spec.submodule_search_locations or [])]):
            return spec
        with open({refused!r}, "a") as refused:  # here, and not on the host
            refused.write(name + "\\n")
        return None


sys.meta_path[:] = [BareHost if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def host_modules() -> set[str]:
    """Top-level modules of HOST and everything they require, by this venv's metadata."""
    seen: set[str] = set()
    todo = list(HOST)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [re.split(r"[<>=!~;\[ (]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r]
    return {module for module, dists in metadata.packages_distributions().items()
            if any(d.lower().replace("_", "-") in seen for d in dists)}


def carried_modules(folder: Path) -> set[str]:
    """Top-level names in what bench/gpu_prepare.sh staged: the packed site, or the wheels."""
    if (folder / "site.tar.xz").exists():
        with tarfile.open(folder / "site.tar.xz") as packed:
            names = [Path(name).parts[0] for name in packed.getnames() if Path(name).parts]
    else:
        names = [name.split("/")[0] for wheel in folder.glob("whl/*.whl") for name in zipfile.ZipFile(wheel).namelist()]
    return {re.sub(r"(\.cpython.*|\.abi3.*)?\.(py|so)$", "", name) for name in names if ".dist-info" not in name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=sorted(PARTS))
    args = parser.parse_args()
    carried = ROOT / ".gpu"
    if not carried.is_dir():
        sys.exit("no .gpu/: run bench/gpu_prepare.sh (engine) or bench/gpu_prepare.sh serve first")
    allowed = sorted(host_modules() | carried_modules(carried) | set(PROJECT))
    with tempfile.TemporaryDirectory() as tmp:
        refused = Path(tmp) / "refused.txt"
        refused.touch()
        (Path(tmp) / "sitecustomize.py").write_text(
            SITECUSTOMIZE.format(allowed=json.dumps(allowed), refused=str(refused)))
        env = {**os.environ, "PYTHONPATH": tmp, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        command = [*PARTS[args.part], tmp] if PARTS[args.part][-1] == "--profile" else PARTS[args.part]
        code = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env).returncode
        names = sorted({line.split(".")[0] for line in refused.read_text().split()})
    print(f"\nimports of modules this venv has, refused as on a bare GPU host (optional ones a library probes for "
          f"are expected): "
          f"{', '.join(names) or 'none'}")
    sys.exit(code)


if __name__ == "__main__":
    main()
