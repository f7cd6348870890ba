"""Seeded query/document sets of real English text (CPython's stdlib docstrings), with no download: the
int8 calibration and probe sets, and the benchmarks' workload."""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import random
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass

# Standard library only: this file also runs as a script in a bare interpreter (_corpus).
logger = logging.getLogger(__name__)

MODULES = (
    "argparse asyncio base64 bisect calendar codecs collections configparser contextlib copy csv dataclasses "
    "datetime decimal difflib email enum fractions functools gettext glob gzip hashlib heapq hmac http.client "
    "http.server imaplib inspect io ipaddress itertools json logging lzma mailbox mimetypes multiprocessing "
    "operator optparse os pathlib pickle pprint queue random re sched secrets selectors shelve shutil signal "
    "smtplib socket sqlite3 ssl statistics string struct subprocess tarfile tempfile textwrap threading time "
    "timeit tokenize traceback types typing unittest urllib.parse urllib.request uuid warnings weakref "
    "xml.etree.ElementTree zipfile zlib"
).split()


@dataclass(frozen=True)
class Request:
    query: str
    documents: list[str]


def _paragraphs(module_name: str) -> list[str]:
    # Some modules warn on import or attribute access (typing.io's deprecation): text is all we read.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
        docs = [inspect.getdoc(module) or ""]
        for name, member in sorted(vars(module).items()):
            if not name.startswith("_") and getattr(member, "__module__", None) == module.__name__:
                docs.append(inspect.getdoc(member) or "")
    # Passages of at least 60 words, as a RAG chunker would cut them: consecutive paragraphs of one docstring.
    passages = []
    for doc in docs:
        current: list[str] = []
        for block in re.split(r"\n\s*\n", doc):
            text = " ".join(block.split())
            if text.startswith((">>>", "...")):
                continue
            current.append(text)
            if sum(len(part.split()) for part in current) >= 60:
                passages.append(" ".join(current))
                current = []
        if sum(len(part.split()) for part in current) >= 12:
            passages.append(" ".join(current))
    return passages


def _read_corpus() -> dict[str, list[str]]:
    """Passages by module, for modules with at least four (it imports about 80 modules)."""
    corpus = {name: _paragraphs(name) for name in MODULES}
    return {name: paras for name, paras in corpus.items() if len(paras) >= 4}


@functools.cache
def _corpus() -> dict[str, list[str]]:
    """_read_corpus, once per process, in a bare interpreter (`-I -S`: the standard library alone), so that the
    text is the same whatever this process imported. torch replaces `inspect.getfile`, which then leaves the inspect
    passages and shifts every seeded pick after it: a start from the conversion cache, which imports no torch, would
    miss the int8 graph that a full load stored under its calibration set's digest (until 2026-12-03 such a start
    imported torch anyway, to read the CPU's int8 features)."""
    try:
        done = subprocess.run([sys.executable, "-I", "-S", __file__], capture_output=True, timeout=300, check=True)
        corpus = json.loads(done.stdout)
        if isinstance(corpus, dict) and corpus:
            return {str(name): [str(p) for p in paras] for name, paras in corpus.items()}
        raise ValueError("the script printed no corpus")
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        logger.warning("the workload's text read in this process instead of a bare interpreter: it may differ "
                       "from another process's", extra={"cause": f"{type(err).__name__}: {err}"[:300]})
        return _read_corpus()


if __name__ == "__main__":
    print(json.dumps(_read_corpus()))


def build_workload(n_requests: int = 32, docs_per_request: int = 50, seed: int = 0, *,
                   distinct: bool = False) -> list[Request]:
    """Each request asks about one module: a few of its paragraphs among random others. `distinct`: no document
    twice in a request (drawn independently, about 2.5% of documents repeat one beside them, which the engine
    scores once); the int8 calibration and probe sets keep the original draw, whose digest names cached graphs."""
    rng = random.Random(seed)
    corpus = _corpus()
    everything = [p for paras in corpus.values() for p in paras]
    if distinct:
        corpus = {name: list(dict.fromkeys(paras)) for name, paras in corpus.items()}
        everything = list(dict.fromkeys(everything))
    names = sorted(corpus)
    requests = []
    for i in range(n_requests):
        topic = names[rng.randrange(len(names))]
        own = rng.sample(corpus[topic], min(8, len(corpus[topic]), docs_per_request))
        first_sentence = own[0].split(". ")[0].rstrip(".")
        query = f"Python {topic} ({i}): how do I {first_sentence[:1].lower()}{first_sentence[1:120]}?"
        taken = set(own)
        pool = [p for p in everything if p not in taken] if distinct else everything
        others = rng.sample(pool, docs_per_request - len(own))
        documents = own + others
        rng.shuffle(documents)
        requests.append(Request(query, documents))
    return requests
