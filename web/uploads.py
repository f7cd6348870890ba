"""Documents from an uploaded file: .txt one per line, .jsonl with a `text` field, .csv with a `text` column."""

from __future__ import annotations

import atexit
import csv
import io
import os
import shutil
import tempfile
from pathlib import Path

from reranker import ValidationError
from reranker.jsonl import JsonLineError, json_lines
from web.service import split_lines

SUFFIXES = (".txt", ".jsonl", ".csv")


class UploadFolderError(ValueError):
    """GRADIO_TEMP_DIR names something Gradio cannot keep uploads in; the message says what to set."""


def private_upload_folder() -> str:
    """Gradio's upload folder for this process, set before its Blocks are built (they read it then): the operator's
    GRADIO_TEMP_DIR, else a folder of this process's own (mode 0700), removed when it exits. Gradio's default,
    /tmp/gradio, is every Gradio app's on the host: a file another one (or another user) left there passed as
    uploaded here, was read, and was deleted at this service's stop. app.py asks before the model loads: a
    GRADIO_TEMP_DIR Gradio cannot write in ended the start after the load, in a traceback (UploadFolderError)."""
    configured = os.environ.get("GRADIO_TEMP_DIR")
    if configured:
        _check_writable(configured)
        return configured
    folder = tempfile.mkdtemp(prefix="reranker-uploads-")
    os.environ["GRADIO_TEMP_DIR"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _check_writable(configured: str) -> None:
    folder = Path(configured)
    advice = "set GRADIO_TEMP_DIR to a folder this user can write in, or unset it (the service makes its own)"
    if folder.exists() and not folder.is_dir():
        raise UploadFolderError(f"GRADIO_TEMP_DIR={configured} is not a folder; {advice}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UploadFolderError(f"GRADIO_TEMP_DIR={configured} cannot be written in: {err.strerror or err}; "
                                f"{advice}") from err


def read_documents(path: str | Path, max_bytes: int) -> list[str]:
    """Parse an upload; raise ValidationError naming the line or column that is wrong."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValidationError(f"cannot read {path.name}: upload a {', '.join(SUFFIXES)} file")
    try:
        if path.stat().st_size > max_bytes:
            raise ValidationError(f"{path.name} is over {max_bytes} bytes; upload a smaller file")
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValidationError(f"{path.name} is not UTF-8 text; save it as UTF-8 and upload it again") from None
    except OSError:  # gone from Gradio's upload folder, or not a file: nothing about the server is said
        raise ValidationError(f"cannot read the uploaded file {path.name}; upload it again") from None
    if suffix == ".txt":
        return split_lines(text)
    if suffix == ".jsonl":
        return _jsonl(path.name, text)
    return _csv(path.name, text, max_bytes)


def _jsonl(name: str, text: str) -> list[str]:
    documents = []
    try:
        for number, record in json_lines(text):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValidationError(f'{name} line {number} needs a string "text" field')
            documents.append(record["text"])
    except JsonLineError as err:
        raise ValidationError(f"{name} {err}") from None
    return documents


def _csv(name: str, text: str, max_field: int) -> list[str]:
    # The csv module's own field cap (128 KiB) is not ours: the engine's limits apply later, with their message.
    csv.field_size_limit(max(max_field, csv.field_size_limit()))
    try:
        # strict: an unclosed quote is an error, where the lax reader took the rest of the file as one field.
        reader = csv.DictReader(io.StringIO(text), strict=True)
        if reader.fieldnames is None or "text" not in reader.fieldnames:
            raise ValidationError(f'{name} needs a header row with a "text" column')
        return [row["text"] for row in reader if row.get("text")]
    except csv.Error as err:
        if "unexpected end of data" in str(err):
            raise ValidationError(f"{name} is not valid CSV: a quote opened after line {reader.line_num} is never "
                                  'closed; close it, or double each " inside a quoted field') from None
        raise ValidationError(f"{name} is not valid CSV (line {reader.line_num}): {err}") from None
