"""Result lines: OpenAI batch result records, the append-only writer, the resume scan.

A record is one JSON line `{"id", "custom_id", "response", "error"}`:
- success: `response = {"status_code": 200, "request_id", "body": <chat.completion or
  text_completion with usage>}`, `error = null`;
- failure: `response = {"status_code": 4xx/5xx, "request_id", "body": {"error": {...}}}` and
  `error = {"code", "message", "line"}` (the input line number).

A record is keyed by its custom_id, or, for a line without a usable custom_id (invalid JSON,
a repeated id), by `("line", n)`: `record_key`. The results file holds each key at most once.

`ResultWriter.open` locks the results file (one run per file), scans it for the keys already
written, cuts a partial last line left by a crash (a line is complete only with its newline;
the request it held runs again), and rewrites the error file from the results file, so it
always lists exactly the failed records. Every record is then appended with one write call
and flushed to the kernel at once, results first, then the error file: a killed run loses
only requests still in flight.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .prompts import Prepared

_ERROR_TYPES = {400: "invalid_request_error", 500: "server_error"}


class ResultsError(Exception):
    """The results file cannot be used; the message names it and what to do."""


def errors_path_for(results: str | os.PathLike[str]) -> Path:
    """results.jsonl -> results.errors.jsonl (next to it)."""
    p = Path(results)
    stem = p.name[:-len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return p.with_name(stem + ".errors.jsonl")


def ok_record(p: Prepared, out: dict, model: str, created: int | None = None,
              include_token_ids: bool = False) -> dict:
    """The success record of `p` from SGLang's `generate` output (`text`, `output_ids`, `meta_info`)."""
    meta = out["meta_info"]
    reason = meta.get("finish_reason") or {}
    finish = "length" if isinstance(reason, dict) and reason.get("type") == "length" else "stop"
    usage = {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": meta["completion_tokens"],
             "total_tokens": meta["prompt_tokens"] + meta["completion_tokens"],
             "prompt_tokens_details": {"cached_tokens": meta.get("cached_tokens", 0)}}
    req = p.request
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]}, "logprobs": None,
                  "finish_reason": finish}
        obj, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {"index": 0, "text": out["text"], "logprobs": None, "finish_reason": finish}
        obj, prefix = "text_completion", "cmpl-"
    if include_token_ids:
        choice["token_ids"] = list(out.get("output_ids") or [])
        choice["prompt_token_ids"] = list(p.input_ids)
    body = {"id": prefix + str(meta.get("id", uuid.uuid4().hex)), "object": obj,
            "created": int(time.time()) if created is None else created, "model": req.model or model,
            "choices": [choice], "usage": usage}
    return {"id": _batch_id(), "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": str(meta.get("id", "")), "body": body}, "error": None}


def error_record(custom_id: str | None, message: str, *, line: int | None = None, code: str = "invalid_request",
                 status: int = 400) -> dict:
    """A failure record; `message` says what went wrong and what to do."""
    request_id = uuid.uuid4().hex
    err_type = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"id": _batch_id(), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id,
                         "body": {"error": {"message": message, "type": err_type, "code": code}}},
            "error": {"code": code, "message": message, "line": line}}


def record_key(record: dict):
    """custom_id, or ("line", n) for a record of a line without a usable custom_id."""
    cid = record.get("custom_id")
    if cid is not None:
        return cid
    err = record.get("error") or {}
    return ("line", err.get("line"))


def is_failure(record: dict) -> bool:
    return record.get("error") is not None or (record.get("response") or {}).get("status_code") != 200


@dataclass
class Done:
    """What a results file already holds."""

    keys: set = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cut_partial_line: bool = False  # a crash left half a line; it was removed

    @property
    def records(self) -> int:
        return self.completed + self.failed


def scan(data: bytes, name: str = "results.jsonl") -> tuple[Done, int, list[bytes]]:
    """Read results bytes: (what they hold, bytes of complete lines, failure lines).

    Raises ResultsError for a complete line that is not a result record or repeats a key: such a
    file was not written by `blendserve run` (or was edited)."""
    done = Done()
    failures = []
    end = data.rfind(b"\n") + 1  # a last line without its newline is partial
    done.cut_partial_line = end < len(data) and bool(data[end:].strip())
    for number, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            ok = isinstance(rec, dict) and "custom_id" in rec and ("response" in rec or "error" in rec)
        except ValueError:
            ok = False
        if not ok:
            raise ResultsError(f"{name} line {number} is not a result record of `blendserve run`; move the file "
                               "away or pass --overwrite to start over")
        key = record_key(rec)
        if key in done.keys:
            raise ResultsError(f"{name} line {number} repeats the result of {key!r}; the file was edited or "
                               "written by two runs: remove the repeated line or pass --overwrite")
        done.keys.add(key)
        if is_failure(rec):
            done.failed += 1
            failures.append(raw + b"\n")
        else:
            done.completed += 1
            usage = rec["response"]["body"].get("usage") or {}
            done.input_tokens += int(usage.get("prompt_tokens", 0))
            done.output_tokens += int(usage.get("completion_tokens", 0))
    return done, end, failures


class ResultWriter:
    """Appends records to the results file (and failures to the error file); see module doc."""

    def __init__(self, path: Path, errors_path: Path, fd: int, errors_fd: int, done: Done):
        self.path, self.errors_path = path, errors_path
        self._fd, self._errors_fd = fd, errors_fd
        self.done = done

    @classmethod
    def open(cls, path: str | os.PathLike[str], errors_path: str | os.PathLike[str] | None = None, *,
             overwrite: bool = False) -> "ResultWriter":
        import fcntl

        path = Path(path)
        errors_path = Path(errors_path) if errors_path is not None else errors_path_for(path)
        if path.is_dir():
            raise ResultsError(f"-o {path} is a directory; pass a file name such as {path / 'results.jsonl'}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise ResultsError(f"cannot write {path}: {exc.strerror}; choose another -o") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ResultsError(f"{path} is being written by another `blendserve run`; wait for it to finish "
                                   "or choose another -o") from None
            if overwrite:
                os.ftruncate(fd, 0)
            with open(path, "rb") as f:
                data = f.read()
            done, end, failures = scan(data, path.name)
            if end < len(data):
                os.ftruncate(fd, end)
            errors_fd = os.open(errors_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            os.write(errors_fd, b"".join(failures))
        except (ResultsError, OSError) as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                raise ResultsError(f"cannot write {exc.filename or path}: {exc.strerror}; choose another -o") from None
            raise
        return cls(path, errors_path, fd, errors_fd, done)

    def write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        key = record_key(record)
        if key in self.done.keys:
            raise ResultsError(f"internal error: a second result for {key!r}")
        self.done.keys.add(key)
        _write_all(self._fd, line)
        if is_failure(record):
            _write_all(self._errors_fd, line)

    def close(self) -> None:
        for fd in (self._errors_fd, self._fd):
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.close(fd)
        self._fd = self._errors_fd = -1

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._fd >= 0:
            self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _batch_id() -> str:
    return "batch_req_" + uuid.uuid4().hex
