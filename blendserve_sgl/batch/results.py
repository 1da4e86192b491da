"""Result lines: OpenAI batch result records, the append-only writer, the resume scan.

A record is one JSON line `{"id", "custom_id", "response", "error", "request_digest"}`:
- success: `response = {"status_code": 200, "request_id", "body": <chat.completion or
  text_completion with usage>}`, `error = null`;
- failure: `response = {"status_code": 4xx/5xx, "request_id", "body": {"error": {...}}}` and
  `error = {"code", "message", "line"}` (the input line number);
- `request_digest` (an extension of the format): the digest of the input line it answers
  (`requests.request_digest`), so a rerun sees lines edited since.

A record is keyed by its custom_id, or, for a line without a usable custom_id (invalid JSON,
a repeated id), by `("line", n)`: `record_key`. The results file holds each key at most once.

`ResultWriter.open` never writes to the input (nor the errors file to the results file: files
are compared by identity, so links and /dev/fd names count). On a regular results file it
locks it (one run per file), scans it for the keys already written, cuts a partial last line
left by a crash (a line is complete only with its newline; the request it held runs again),
and rebuilds the error file from the results file (a new file put in place by rename), so it
always lists exactly the failed records. A results file that is not a regular file (a pipe,
/dev/stdout, /dev/null) is written as a stream: no scan, no lock; like any name of an open
file (/dev/stdout redirected to a file, /dev/fd/N) it gets no error file unless `--errors`
names one. `drop(keys)` removes records (to run their requests again) by writing
the kept ones to a new file put in place by rename. Every record is appended with one write
call and flushed to the kernel at once, results first, then the error file: a killed run loses
only requests still in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import time
import uuid
from array import array
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
            "system_fingerprint": fingerprint(model), "choices": [choice], "usage": usage}
    return {"id": _batch_id(), "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": str(meta.get("id", "")), "body": body}, "error": None,
            "request_digest": req.digest}


def fingerprint(model: str) -> str:
    """The success records' `system_fingerprint`: the model that generated them (a resumed run
    compares it with its own)."""
    return f"blendserve-sgl:{model}"


def error_record(custom_id: str | None, message: str, *, line: int | None = None, code: str = "invalid_request",
                 status: int = 400, digest: str = "") -> dict:
    """A failure record; `message` says what went wrong and what to do."""
    request_id = uuid.uuid4().hex
    err_type = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"id": _batch_id(), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id,
                         "body": {"error": {"message": message, "type": err_type, "code": code}}},
            "error": {"code": code, "message": message, "line": line}, "request_digest": digest}


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
    digests: dict = field(default_factory=dict)  # key -> request_digest of records that carry one
    failed_keys: set = field(default_factory=set)
    fingerprints: dict = field(default_factory=dict)  # system_fingerprint -> success records carrying it
    places: "Places | None" = field(default=None, compare=False, repr=False)  # where the records are (`ResultWriter`'s
    # scan; None once the file changed)

    @property
    def records(self) -> int:
        return self.completed + self.failed


RECORD_START = b'{"id": "batch_req_'  # how every record line begins (`_batch_id`, written by `ResultWriter.write`)


_CHUNK = 1 << 20  # bytes read at a time: no file is ever held whole


def _reader(source):
    """read(n, pos) over a file descriptor or a bytes object."""
    if isinstance(source, int):
        return lambda n, pos: os.pread(source, n, pos)
    data = bytes(source)
    return lambda n, pos: data[pos:pos + n]


def _lines(read):
    """(offset, line without its newline, complete) for every line; the bytes after the last
    newline, if any, come last with complete False. Reads `_CHUNK` bytes at a time."""
    pos, parts, at = 0, [], 0
    while chunk := read(_CHUNK, pos):
        pos += len(chunk)
        cut = chunk.rfind(b"\n")
        if cut < 0:
            parts.append(chunk)
            continue
        parts.append(chunk[:cut])
        for raw in b"".join(parts).split(b"\n"):
            yield at, raw, True
            at += len(raw) + 1
        parts = [chunk[cut + 1:]]
    tail = b"".join(parts)
    if tail:
        yield at, tail, False


def _line_hash(raw: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


class Failures:
    """The failure lines of a results file, not their text: where each is in the file it was
    scanned from (read back on demand) and a 64-bit hash of each, for the error file's check."""

    def __init__(self, read=None):
        self._read = read
        self.at, self.size, self.hashes = array("q"), array("q"), array("Q")

    def add(self, at: int, raw: bytes) -> None:
        self.at.append(at)
        self.size.append(len(raw))
        self.hashes.append(_line_hash(raw))

    def take(self, other: "Failures", j: int) -> None:
        """Append `other`'s line `j` (its place, size and hash)."""
        self.at.append(other.at[j])
        self.size.append(other.size[j])
        self.hashes.append(other.hashes[j])

    def __len__(self) -> int:
        return len(self.at)

    def nbytes(self) -> int:
        """Their bytes, newlines included."""
        return sum(self.size) + len(self.size)

    def lines(self):
        """Each failure line with its newline, in file order; adjacent lines (the common case: a run
        whose failures came together) are read back together, up to `_CHUNK` bytes a read."""
        at, size, i, count = self.at, self.size, 0, len(self.at)
        while i < count:
            j, span = i + 1, size[i] + 1
            while j < count and at[j] == at[i] + span and span + size[j] + 1 <= _CHUNK:
                span += size[j] + 1
                j += 1
            block = _read_exact(self._read, span, at[i])  # each line's newline included: complete lines
            offset = 0
            for k in range(i, j):
                n = size[k]
                if block[offset + n:offset + n + 1] != b"\n":
                    raise ResultsError("the results file changed while it was read back; run the same command again")
                yield block[offset:offset + n + 1]
                offset += n + 1
            i = j

    def write_to(self, fd: int) -> None:
        buf, held = [], 0
        for raw in self.lines():
            buf.append(raw)
            held += len(raw)
            if held >= _CHUNK:
                _write_all(fd, b"".join(buf))
                buf, held = [], 0
        _write_all(fd, b"".join(buf))


class Places:
    """Where each record of a scanned results file is, in file order (its key and line's byte
    range), and the scan's failure lines: `drop` finds the lines it keeps without parsing the
    file again. 24 bytes a record."""

    __slots__ = ("keys", "at", "end", "failures")

    def __init__(self):
        self.keys, self.at, self.end = [], array("q"), array("q")
        self.failures = Failures()

    def add(self, key, at: int, end: int) -> None:
        self.keys.append(key)
        self.at.append(at)
        self.end.append(end)


def scan(data, name: str = "results.jsonl", places: bool = False) -> tuple[Done, int, Failures]:
    """Read results (bytes, or a file descriptor read in `_CHUNK`s): (what they hold, bytes of
    complete lines, the failure lines).

    Raises ResultsError for a complete line that is not a result record or repeats a key: such a
    file was not written by `blendserve run` (or was edited). `places`: keep where each record
    is (`Done.places`)."""
    done, end, failures, _ = _scan(_reader(data), name, places=places)
    return done, end, failures


def _scan(read, name: str, drop: set | None = None, places: bool = False) -> tuple[Done, int, Failures, list]:
    """`scan`, leaving out the records of the keys in `drop`; with `drop`, also returns the byte
    ranges [start, end) of the lines kept (adjacent lines merged), else []."""
    done = Done(places=Places() if places else None)
    failures = Failures(read)
    if done.places is not None:
        done.places.failures = failures
    kept: list[list[int]] = []
    end = 0
    for number, (at, raw, complete) in enumerate(_lines(read), start=1):
        if not complete:  # a last line without its newline is partial
            tail = raw.strip()
            if tail and not (tail.startswith(RECORD_START) or RECORD_START.startswith(tail)):
                raise ResultsError(f"{name} ends with a line that is neither a result record of `blendserve run` "
                                   "nor the start of one; move the file away or pass --overwrite to start over")
            done.cut_partial_line = bool(tail)
            break
        end = at + len(raw) + 1
        if not raw.strip():
            continue
        rec = _record(raw)
        if rec is None:
            hint = (f"if the lines around it are this run's records and only it was damaged, delete line {number} "
                    "(its request then runs again) and run the same command; else " if number > 1 else "")
            raise ResultsError(f"{name} line {number} is not a result record of `blendserve run`; {hint}move the "
                               "file away or pass --overwrite to start over")
        key = record_key(rec)
        if drop is not None and key in drop:
            continue
        if key in done.keys:
            raise ResultsError(f"{name} line {number} repeats the result of {key!r}; the file was edited or "
                               "written by two runs: remove the repeated line or pass --overwrite")
        if drop is not None:  # only `drop` copies the kept lines
            _keep(kept, at, end)
        done.keys.add(key)
        if done.places is not None:
            done.places.add(key, at, end)
        if isinstance(rec.get("request_digest"), str) and rec["request_digest"]:
            done.digests[key] = rec["request_digest"]
        if is_failure(rec):
            done.failed += 1
            done.failed_keys.add(key)
            failures.add(at, raw)
        else:
            _count_success(done, rec, 1)
    return done, end, failures, kept


def _keep(kept: list, at: int, end: int) -> None:
    """Add the line [at, end) to the kept byte ranges, merged with the last one it follows."""
    if kept and kept[-1][1] == at:
        kept[-1][1] = end
    else:
        kept.append([at, end])


def _count_success(done: Done, rec: dict, sign: int) -> None:
    """Count a success record into (+1) or out of (-1) `done`."""
    done.completed += sign
    mark = rec["response"]["body"].get("system_fingerprint")
    if isinstance(mark, str):
        done.fingerprints[mark] = done.fingerprints.get(mark, 0) + sign
        if not done.fingerprints[mark]:
            del done.fingerprints[mark]
    usage = rec["response"]["body"].get("usage") or {}
    done.input_tokens += sign * int(usage.get("prompt_tokens", 0))
    done.output_tokens += sign * int(usage.get("completion_tokens", 0))


def _placed_drop(read, done: Done, keys: set):
    """What `_scan(read, drop=keys)` finds in the file `done` was scanned from (with `places`),
    from where its records are: only the dropped success records are read and parsed again.
    Returns (the kept byte ranges, the kept failures, how to make `done` what the scan would
    return: call it once the file is rewritten)."""
    places, kept, left = done.places, [], Failures(read)
    failures = places.failures
    gone_successes, j, count = [], 0, len(failures)
    for key, at, end in zip(places.keys, places.at, places.end):
        failure = j < count and failures.at[j] == at  # both in file order
        if key in keys:
            if failure:
                j += 1
            else:
                gone_successes.append(_record(_read_exact(read, end - at - 1, at)))
            continue
        if failure:
            left.take(failures, j)
            j += 1
        _keep(kept, at, end)
    if j != count or any(rec is None for rec in gone_successes):
        raise ResultsError("internal error: the results file changed since it was scanned")

    def settle() -> None:  # in place: no second set of a million keys
        for key in keys:
            if key in done.keys:
                done.keys.discard(key)
                done.digests.pop(key, None)
                if key in done.failed_keys:
                    done.failed_keys.discard(key)
                    done.failed -= 1
        for rec in gone_successes:
            _count_success(done, rec, -1)
        done.cut_partial_line = False  # what a scan of the rewritten file says
        done.places = None  # the rewrite moved the lines

    return kept, left, settle


def check_integrity(path: str | os.PathLike[str], errors_path: str | os.PathLike[str] | None = None) -> Done:
    """The invariants of a finished run's files (ResultsError if one fails): every line of the
    results file a complete record, each key once, and the error file holding exactly its
    failure records, in the same order. Both files are read in chunks, never held whole."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        done, end, failures = scan(fd, path.name)
        if end < os.fstat(fd).st_size:
            raise ResultsError(f"{path} ends with a partial line")
        if errors_path is not None and not _holds_exactly(Path(errors_path), failures):
            raise ResultsError(f"{errors_path} does not hold exactly the failed records of {path}")
    finally:
        os.close(fd)
    return done


def _holds_exactly(path: Path, failures: Failures) -> bool:
    fd = os.open(path, os.O_RDONLY)
    read = _reader(fd)
    try:
        if os.fstat(fd).st_size != failures.nbytes():
            return False
        pos = 0
        for raw in failures.lines():
            if _read_exact(read, len(raw), pos) != raw:
                return False
            pos += len(raw)
        return True
    finally:
        os.close(fd)


def _record(raw: bytes) -> dict | None:
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return rec if _is_record(rec) else None


def _is_record(rec) -> bool:
    """The shape `scan` relies on: custom_id a string (or null with the error's line number), the
    error null or an object, the response an object; a success's usage token counts integers."""
    if not (isinstance(rec, dict) and "custom_id" in rec and ("response" in rec or "error" in rec)):
        return False
    cid, err, resp = rec.get("custom_id"), rec.get("error"), rec.get("response")
    if not (cid is None or isinstance(cid, str)) or not (err is None or isinstance(err, dict)):
        return False
    if cid is None and not (isinstance(err, dict) and _is_int(err.get("line"))):
        return False
    if not (resp is None or isinstance(resp, dict)):
        return False
    if is_failure(rec):
        return True
    body = resp.get("body")
    usage = body.get("usage") if isinstance(body, dict) else None
    return isinstance(body, dict) and (usage is None or isinstance(usage, dict) and all(
        _is_int(usage.get(k, 0)) for k in ("prompt_tokens", "completion_tokens")))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def request_key(item):
    """The key the record of an input item (`BatchRequest`, `LineError` or `Prepared`) will have."""
    item = getattr(item, "request", item)
    return item.custom_id if item.custom_id is not None else ("line", item.line)


@dataclass
class Resume:
    """How the records of a results file relate to the input lines (`reconcile`)."""

    foreign: list = field(default_factory=list)  # custom_ids with a record but no line in the input
    stale: set = field(default_factory=set)  # ("line", n) records whose line is gone or changed: dropped
    changed: list = field(default_factory=list)  # (key, line) of requests edited since their record
    taken: list = field(default_factory=list)  # (key, line): a duplicate line that now owns its custom_id
    retry: set = field(default_factory=set)  # keys whose records are dropped to run them again
    kept_errors: int = 0  # error records kept as done

    @property
    def drop(self) -> set:
        return self.stale | self.retry


def reconcile(done: Done, items, retry_failed: bool = False) -> Resume:
    """Match `done` against the input `items`: records of lines without a custom_id are kept only
    while their line is unchanged (fixing or moving such a line is never refused); a record whose
    request changed since is reported, and run again with `retry_failed`, as are error records.
    A line whose custom_id record answers another line, while the line itself, as it is now, has
    the error record of a duplicate custom_id (the earlier line holding that id was renamed or
    removed), runs: its custom_id's record is dropped (`taken`), whatever `retry_failed`."""
    res = Resume()
    lines = {}
    duplicates = {done.digests[k] for k in done.keys if isinstance(k, tuple) and k in done.digests}
    for item in items:
        key = request_key(item)
        lines[key] = item
        if key not in done.keys:
            continue
        old = done.digests.get(key)
        if old and item.digest and old != item.digest:
            if isinstance(key, tuple):
                res.stale.add(key)  # a record keyed by its line: another line stands there now
            elif item.digest in duplicates:  # this very line was refused as a duplicate: the record is another's
                res.taken.append((key, item.line))
                res.retry.add(key)
            else:
                res.changed.append((key, item.line))
                if retry_failed:
                    res.retry.add(key)
        if retry_failed and key in done.failed_keys and key not in res.stale:
            res.retry.add(key)
    for key in done.keys:
        if key not in lines:
            (res.stale.add(key) if isinstance(key, tuple) else res.foreign.append(key))
    res.kept_errors = len(done.failed_keys - res.drop)
    return res


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when both names lead to one file (links, /dev/fd and /proc names resolved)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def is_regular_or_new(path: str | os.PathLike[str]) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True


class ResultWriter:
    """Appends records to the results file (and failures to the error file); see module doc."""

    def __init__(self, path: Path, errors_path: Path | None, fd: int, errors_fd: int, done: Done, regular: bool,
                 created: tuple = ()):
        self.path, self.errors_path = path, errors_path
        self._fd, self._errors_fd = fd, errors_fd
        self.done = done
        self.regular = regular  # False: a stream (pipe, /dev/stdout, /dev/null), nothing read back
        self.created = created  # the regular files this run created (`discard_created`)

    def unnamed(self) -> bool:
        """The results file is no longer at its path (removed, or replaced by another file, while
        this run wrote): what was written went to a file no name reaches."""
        if not self.regular or self._fd < 0:
            return False
        try:
            held, named = os.fstat(self._fd), os.stat(self.path)
        except OSError:
            return True
        return (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino)

    def discard_created(self) -> None:
        """Close, and remove the files this run created while they are still empty (a run refused
        after the files were opened, e.g. an input with no requests, leaves nothing behind)."""
        self.close()
        for path in self.created:
            with contextlib.suppress(OSError):
                if path.stat().st_size == 0:
                    path.unlink()

    @classmethod
    def open(cls, path: str | os.PathLike[str], errors_path: str | os.PathLike[str] | None = None, *,
             overwrite: bool = False, input_path: str | os.PathLike[str] | None = None) -> "ResultWriter":
        """`errors_path` None: `errors_path_for(path)` next to a regular results file, none for a
        stream. `input_path`: the input, which neither file may be."""
        path = Path(path)
        if path.is_dir():
            raise ResultsError(f"-o {path} is a directory; pass a file name such as {path / 'results.jsonl'}")
        regular = is_regular_or_new(path)
        explicit = errors_path is not None
        errors_path = Path(errors_path) if explicit else (
            errors_path_for(path) if regular and not _names_an_open_file(path) else None)
        what = f"--errors {errors_path}" if explicit else f"the errors file {errors_path} (next to -o)"
        if not path.parent.is_dir():  # said of -o itself, not of the errors file beside it
            raise ResultsError(f"-o {path}: the folder {path.parent} does not exist; create it or choose another -o")
        if errors_path is not None and errors_path.is_dir():
            raise ResultsError(f"{what} is a directory; pass a file name with --errors")
        if errors_path is not None and not errors_path.parent.is_dir():
            raise ResultsError(f"{what}: the folder {errors_path.parent} does not exist; create it or choose another "
                               "--errors")
        if input_path is not None and same_file(path, input_path):
            raise ResultsError(f"-o {path} is the input file {input_path}; results are never written into the "
                               "input: choose another -o")
        if input_path is not None and errors_path is not None and same_file(errors_path, input_path):
            raise ResultsError(f"{what} is the input file {input_path}; choose another --errors")
        if errors_path is not None and (same_file(errors_path, path) or errors_path == path):
            raise ResultsError(f"{what} is the results file -o {path}; choose another --errors")
        fd, existed = -1, path.exists()
        errors_existed = errors_path is not None and errors_path.exists()
        try:
            if regular:
                fd, done, failures, earlier, cut = _open_results(path, overwrite)
            else:
                fd, done, cut = os.open(path, os.O_WRONLY | os.O_APPEND), Done(), None
                failures, earlier = Failures(), Failures()
            errors_fd = _rebuild(errors_path, failures, mine=((failures, earlier), what, path)) \
                if errors_path is not None else -1
            if cut is not None:  # the errors file taken: only now is -o emptied or its partial line cut
                os.ftruncate(fd, cut)
        except (ResultsError, OSError) as exc:
            if fd >= 0:
                if regular and not existed and os.fstat(fd).st_size == 0:
                    path.unlink(missing_ok=True)  # refused (its errors file busy): leave no empty results file
                os.close(fd)
            if isinstance(exc, OSError):
                raise ResultsError(f"cannot write {exc.filename or path}: {exc.strerror}; choose another -o") from None
            raise
        created = tuple(p for p, was in ((path, existed), (errors_path, errors_existed))
                        if p is not None and not was and p.is_file())
        for held in (path if regular else None, errors_path if errors_fd >= 0 and is_regular_or_new(errors_path)
                     else None):
            if held is not None:
                sweep_tmps(held)  # both files locked by this run now: a copy left by a killed run is garbage
        return cls(path, errors_path, fd, errors_fd, done, regular, created)

    def drop(self, keys: set) -> None:
        """Remove the records of `keys` (their requests run again): the kept records go to a new
        file, locked, then renamed over the results file; the error file is rebuilt to match."""
        if not keys:
            return
        old = self._fd
        if self.done.places is not None:  # where the records are is known: nothing parsed again but dropped successes
            kept, failures, settle = _placed_drop(_reader(old), self.done, keys)
        else:  # the file is read, not held
            done, _, failures, kept = _scan(_reader(old), self.path.name, drop=keys)
            settle = None

        def copy_kept(out: int) -> None:
            read = _reader(old)
            for start, end in kept:
                for pos in range(start, end, _CHUNK):
                    _write_all(out, _read_exact(read, min(_CHUNK, end - pos), pos))

        try:
            # the error file first: a kill between the two renames leaves it a subset of the results'
            # error records, which the next run takes and rebuilds (the other order left it holding
            # records the results no longer had, and every rerun refused it as another run's; a probe)
            if self.errors_path is not None:
                os.close(self._errors_fd)
                self._errors_fd = -1
                self._errors_fd = _rebuild(self.errors_path, failures)
            fd = _replace(self.path, copy_kept, locked=True)
        except OSError as exc:
            raise ResultsError(f"cannot rewrite {exc.filename or self.path} without the {len(keys):,} records to run "
                               f"again: {exc.strerror} (it needs room for a copy of the records kept, "
                               f"{sum(e - b for b, e in kept):,} bytes); nothing was changed: free some space and run "
                               "the same command again") from None
        os.close(self._fd)
        self._fd = fd
        if settle is not None:
            settle()
        else:
            self.done = done

    def write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        key = record_key(record)
        if key in self.done.keys:
            raise ResultsError(f"internal error: a second result for {key!r}")
        self.done.places = None  # a record not among them: `drop` scans the file again
        for fd, path in ((self._fd, self.path), (self._errors_fd if is_failure(record) else -1, self.errors_path)):
            if fd < 0:
                continue
            try:
                _write_all(fd, line)
            except OSError as exc:  # a full disk, a closed pipe (`-o /dev/stdout | head`)
                raise ResultsError(f"cannot write {path}: {exc.strerror}; the records written before are kept: fix "
                                   "that, then rerun the same command to finish") from None
            self.done.keys.add(key)

    def close(self) -> None:
        for fd in (self._errors_fd, self._fd):
            if fd < 0:
                continue
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


def _names_an_open_file(path: Path) -> bool:
    """/dev/stdout, /dev/fd/N, /proc/self/fd/N (also when they lead to a regular file, as with
    `-o /dev/stdout > out.jsonl`): no folder to put a side file in. A folder under /dev (/dev/shm,
    a tmpfs) is a folder: its results get their errors file as anywhere else."""
    parent = os.path.realpath(path.parent)
    return parent == "/dev" or re.fullmatch(r"/proc/[^/]+/fd", parent) is not None


def _open_results(path: Path, overwrite: bool) -> tuple[int, Done, Failures, Failures, int | None]:
    """Open and lock a regular results file (retrying when a run renamed a new file over it
    while this one waited) and scan it (read in chunks, never held whole). Returns (fd, what it
    holds, its failure lines, the failure lines `overwrite` discards, the size to cut it to: 0
    with `overwrite`, the end of its last whole line when a partial one follows, else None); the
    caller cuts it."""
    fd = _open_locked(path, "-o")
    try:
        if overwrite:
            try:  # the error records of what is discarded: the errors file may hold them, nothing else
                earlier = scan(fd, path.name)[2]
            except ResultsError:
                earlier = Failures()
            return fd, Done(), Failures(), earlier, 0
        done, end, failures = scan(fd, path.name, places=True)
        size = os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise
    return fd, done, failures, Failures(), end if end < size else None


def _open_locked(path: Path, flag: str) -> int:
    """`path` opened (created if missing) and locked for this run alone, retrying when a run renamed
    a new file over it while this one waited; `flag` names the option that chose it."""
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise ResultsError(f"cannot write {path}: {exc.strerror}; choose another {flag}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ResultsError(f"{path} is being written by another `blendserve run`; wait for it to finish "
                               f"or choose another {flag}") from None
        held = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
            return fd
        os.close(fd)  # locked an old file that was replaced meanwhile: lock the current one


def _rebuild(errors_path: Path, lines: Failures, mine: tuple[tuple, str, Path] | None = None) -> int:
    """The error file holding exactly `lines` (read back from the results file they were
    scanned from), open for appending. A regular (or new) file is
    rebuilt as a new file renamed over it, so it is never emptied before the new content is
    there, and locked like the results file (two runs naming one --errors file: the second stops);
    a stream (/dev/stderr, a pipe) is opened for appending as it is. `mine` (the `Failures` the
    file may hold, how to name it, the results file): a file holding anything else is another
    file or another run's errors, and is refused untouched."""
    if not is_regular_or_new(errors_path):
        return os.open(errors_path, os.O_WRONLY | os.O_APPEND)
    guard = _open_locked(errors_path, "--errors")  # one run per error file, as per results file
    try:
        if mine is not None:
            _check_errors_file(guard, *mine)
        return _replace(errors_path, lines.write_to, locked=True)
    finally:
        os.close(guard)


def _check_errors_file(fd: int, allowed: tuple, what: str, results: Path) -> None:
    """Refuse an existing errors file (`fd`, read in chunks) that holds a line other than the
    error records of `results` (`allowed`: `Failures`, compared by hash; a last line cut short
    by a crash may be the start of one)."""
    import numpy as np

    ok = np.unique(np.concatenate([np.frombuffer(f.hashes, np.uint64) for f in allowed] + [np.zeros(0, np.uint64)]))
    numbers, hashes, partial = array("q"), array("Q"), None
    for number, (_, raw, complete) in enumerate(_lines(_reader(fd)), start=1):
        if not raw.strip():
            continue
        if complete:
            numbers.append(number)
            hashes.append(_line_hash(raw))
        elif not any(line.startswith(raw) for f in allowed for line in f.lines()):
            partial = number
    bad = np.flatnonzero(~np.isin(np.frombuffer(hashes, np.uint64), ok))
    others = len(bad) + (partial is not None)
    if others:
        first = numbers[int(bad[0])] if len(bad) else partial
        raise ResultsError(f"{what} already holds {others:,} line{'s' if others != 1 else ''} that "
                           f"{'are' if others != 1 else 'is'} not an error record of -o {results} (the first: "
                           f"line {first}): another file, or the errors of another run, which this run would "
                           "overwrite; move it, or choose another --errors")


_TMP = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.tmp")  # `_replace`'s new file before its rename


def sweep_tmps(path: str | os.PathLike[str]) -> int:
    """Remove the new files `_replace` left next to `path` (its link target) when a run was killed
    before renaming one over it: only those of that name no process holds locked (a run writing
    one locks it). Returns how many were removed."""
    import fcntl

    target = Path(os.path.realpath(path))
    removed = 0
    try:
        names = [n for n in os.listdir(target.parent) if n.endswith(".tmp") and n.startswith(f".{target.name}.")]
    except OSError:
        return 0
    for name in names:
        m = _TMP.fullmatch(name)
        if not m or m["name"] != target.name:
            continue
        try:
            fd = os.open(target.parent / name, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(target.parent / name)
            removed += 1
        except OSError:
            pass  # a run is writing it, or it went meanwhile
        finally:
            os.close(fd)
    return removed


def _replace(path: Path, data, *, locked: bool) -> int:
    """Write `data` (bytes, or a function that writes to the descriptor it is given) to a new
    file next to `path` (its link target), rename it over `path`, and return the new file open
    for appending (locked first when `locked`, so no other run can take it in between)."""
    import fcntl

    target = Path(os.path.realpath(path))
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o644
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, mode)
    try:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        data(fd) if callable(data) else _write_all(fd, data)
        os.fsync(fd)
        os.replace(tmp, target)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return fd


def _read_exact(read, n: int, pos: int) -> bytes:
    """`n` bytes at `pos` (a short read, which files give only at their end, read on)."""
    parts = []
    while n > 0:
        got = read(n, pos)
        if not got:
            raise ResultsError("internal error: a results file shrank while it was read")
        parts.append(got)
        n -= len(got)
        pos += len(got)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _batch_id() -> str:
    return "batch_req_" + uuid.uuid4().hex
