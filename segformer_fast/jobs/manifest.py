"""``manifest.jsonl``: the record of a segment job, one JSON line per processed image, and how a re-run reads it.

A record holds ``input`` (absolute path), ``output`` (the labels PNG), ``status`` ("ok" or "failed"), ``error``
(null or the reason), ``worker`` (host:pid, or "rank r host:pid") and ``seconds``, and ``settings`` (what the
outputs were made with: a re-run with other settings redoes the image). Only one process writes it (the CLI, the
Ray driver, torchrun's rank 0), appending a flushed line per image as results arrive.

Every record starts on a new line: a writer that finds the file ending inside a line (a run killed mid-write) ends
that line first. A reader reports a line that is not complete JSON (a torn line) by number and skips it; a line
that is JSON but not a record, or not UTF-8, is an error naming the manifest and the line.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST_NAME = "manifest.jsonl"


def _record(path: Path, number: int, raw: bytes):
    """The record on one line, None for a torn line; ValueError naming the file and line for anything else."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}, line {number}: not UTF-8 text ({error.reason} at byte {error.start}); "
                         "move the manifest aside to start over") from None
    if not line:
        return None, False
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None, True
    if not (isinstance(record, dict) and isinstance(record.get("input"), str)
            and record.get("status") in ("ok", "failed")):
        raise ValueError(f"{path}, line {number}: not a segformer-fast manifest record (it needs a string 'input' "
                         f"and a 'status' of ok or failed): {line[:80]}")
    return record, False


def read_manifest(path: Path, torn: list | None = None) -> dict:
    """The latest record of each input (empty when there is no manifest). Torn lines are skipped, their numbers
    appended to ``torn`` when a list is given."""
    path = Path(path)
    latest = {}
    if not path.is_file():
        return latest
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            record, is_torn = _record(path, number, raw)
            if is_torn and torn is not None:
                torn.append(number)
            if record is not None:
                latest[record["input"]] = record
    return latest


class ManifestWriter:
    """Appends records to the manifest, one flushed JSON line each, every one starting on a new line."""

    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "ab")
        if self.file.tell() > 0:
            with open(path, "rb") as existing:
                existing.seek(-1, 2)
                if existing.read(1) != b"\n":  # a torn last line: end it, so the next record stands alone
                    self.file.write(b"\n")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record).encode("utf-8") + b"\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
