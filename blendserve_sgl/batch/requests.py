"""Input lines of the OpenAI Batch API format, read and validated.

One request per line: `{"custom_id": str, "method": "POST", "url": URL, "body": {...}}` with URL
`/v1/chat/completions` (body `messages`) or `/v1/completions` (body `prompt`). `read_requests`
yields, for every non-blank line and in file order, either a `BatchRequest` or a `LineError`;
a bad line never stops the others. Checks here need no model; those that do (chat template,
prompt length against the context) are in `prompts.py`.

Contract of a `LineError`: `message` starts with `<file> line <n>:` and names the field and
the fix; `custom_id` is the line's id when the line has a usable one (a string, not used by an
earlier line), else None (the record is then identified by its line number). The first line
that uses a custom_id owns it, valid or not; later lines with the same id are errors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
ROLES = {"system", "user", "assistant", "developer"}
MAX_STOP = 32  # SGLang's limit on stop strings
TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary" top_k
MAX_SEED = 2**63 - 1  # SGLang's sampling seeds are int64
MAX_DIGITS = 100  # an integer with more digits is refused while parsing
MAX_LINE_BYTES = 128 << 20  # a longer line is an error, never held in memory (a 1M-token prompt is ~25 MB of JSON)

MIN_REPETITION_PENALTY = 0.01  # below it the engine divides a logit into infinity and its sampler stops the engine

# body field -> (SGLang sampling-params name, low, high, low included, what it must be)
_NUMBER_FIELDS = {
    "temperature": ("temperature", 0.0, 2.0, True, "a number from 0 to 2"),
    "top_p": ("top_p", 0.0, 1.0, False, "a number above 0 and at most 1"),
    "min_p": ("min_p", 0.0, 1.0, True, "a number from 0 to 1"),
    "presence_penalty": ("presence_penalty", -2.0, 2.0, True, "a number from -2 to 2"),
    "frequency_penalty": ("frequency_penalty", -2.0, 2.0, True, "a number from -2 to 2"),
    "repetition_penalty": ("repetition_penalty", MIN_REPETITION_PENALTY, 2.0, True, "a number from 0.01 to 2"),
}
_COMMON_FIELDS = {"model", "max_tokens", "stop", "seed", "top_k", "ignore_eos", "n", "stream", "user",
                  *_NUMBER_FIELDS}
BODY_FIELDS = {
    "chat": _COMMON_FIELDS | {"messages", "max_completion_tokens"},
    "completion": _COMMON_FIELDS | {"prompt"},
}
# OpenAI fields a run does not do, taken when they hold the value that asks for nothing (what
# OpenAI does without them: clients write these defaults out); any other value is refused
_DEFAULT_ONLY = {
    "logprobs": (False,), "top_logprobs": (0,), "stream_options": (), "response_format": ({"type": "text"},),
    "tools": ([],), "functions": ([],), "tool_choice": ("none",), "parallel_tool_calls": (True, False),
    "logit_bias": ({},), "store": (False,), "metadata": ({},), "echo": (False,), "best_of": (1,), "suffix": ("",),
}
TOP_FIELDS = ("custom_id", "method", "url", "body")
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark some editors write at the start of a file
COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
              b"PK\x03\x04": "ZIP"}  # how such files begin; a JSONL file begins with text


def compression(head: bytes) -> str | None:
    """The compressed format a file's first bytes announce (`COMPRESSED`), or None."""
    return next((name for magic, name in COMPRESSED.items() if head.startswith(magic)), None)


def wide_text(head: bytes) -> str | None:
    """"UTF-16" or "UTF-32" when a file's first bytes are such text (a byte-order mark, or the NUL
    bytes beside ASCII that those encodings put there: JSON and CSV in UTF-8 have none), or None."""
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    if b"\x00" in head[:4]:
        return "UTF-32" if head[:4].count(b"\x00") == 3 else "UTF-16"
    return None


class InputError(Exception):
    """The input file as a whole cannot be read; the message names it and the reason."""


@dataclass(frozen=True, slots=True)
class BatchRequest:
    line: int  # 1-based line of the input file
    custom_id: str
    kind: str  # "chat" | "completion"
    messages: tuple[dict, ...] | None  # chat: {"role", "content": str (text parts joined by a space), "name" (not a user's)}
    prompt: str | tuple[int, ...] | None  # completion: text or token ids
    max_tokens: int | None  # None: the run's default (capped by the context)
    sampling: dict = field(default_factory=dict)  # SGLang sampling params except max_new_tokens
    model: str | None = None  # echoed in the response body
    digest: str = ""  # request_digest of the line (see `request_digest`)
    # chat: per message, the text parts of a content list (None for a string), for a template that
    # iterates content (`prompts.template_messages`); None when no message has a list
    parts: tuple | None = None


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    custom_id: str | None
    message: str  # "<file> line <n>: <problem and fix>"
    code: str = "invalid_request"
    digest: str = ""  # request_digest of the line


class BadLine(Exception):
    """What is wrong with one line (becomes its `LineError`); also the trace reader's."""


def check_readable(path: str | os.PathLike[str]) -> Path:
    """Fail fast (InputError) unless `path` can be read. A regular file is probed by reading one
    byte; a pipe, FIFO or terminal (`/dev/stdin`, `<(...)`) is only checked for permission: it
    can be read once, as a stream, and `read_requests` does that. `-` is standard input."""
    p = Path("/dev/stdin" if str(path) == "-" else path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; pass the JSONL file of requests (OpenAI Batch API format)") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path} is a directory; pass the JSONL file of requests")
    if not stat.S_ISREG(st.st_mode):
        if not os.access(p, os.R_OK):
            raise InputError(f"cannot read {path}: permission denied")
        return p
    try:
        with open(p, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    packed = compression(head)
    if packed:
        raise InputError(f"{path} is {packed}-compressed, not JSONL text; decompress it first (`{packed} -dk {path}`)"
                         if packed != "ZIP" else f"{path} is a ZIP archive, not JSONL text; extract the requests "
                         "file from it")
    wide = wide_text(head)
    if wide:
        raise InputError(f"{path} is {wide} text, not UTF-8 (its first bytes hold NUL: if it is UTF-8 after all, "
                         f"remove them); save it as UTF-8 (`iconv -f {wide} -t UTF-8 {path} > requests.jsonl`)")
    return p


def read_requests(path: str | os.PathLike[str]) -> Iterator[BatchRequest | LineError]:
    """Every non-blank line of `path`, parsed and validated, in file order (see module doc)."""
    p = check_readable(path)
    name = p.name
    owner: dict[str, int] = {}  # custom_id -> line that uses it first
    with open(p, "rb") as f:  # read once, as a stream: a pipe has no second pass
        for number, raw in iter_lines(f):
            item = parse_line(raw, number, name)
            cid = item.custom_id
            if cid is not None:
                if cid in owner:
                    yield repeated_id(number, cid, owner[cid], name, item.digest)
                    continue
                owner[cid] = number
            yield item


@dataclass(frozen=True, slots=True)
class TooLong:
    """A line longer than `MAX_LINE_BYTES`, skipped without being held."""

    size: int  # bytes before its newline
    digest: str  # blake2b-128 of those bytes


def iter_lines(f) -> Iterator[tuple[int, bytes | TooLong]]:
    """(line number, bytes) of every non-blank line of the binary stream `f`, a UTF-8 BOM before
    line 1 dropped. A line over `MAX_LINE_BYTES` (a file with no newlines, `/dev/zero`) is read
    on in pieces and comes back as `TooLong`: memory stays bounded whatever the input."""
    number = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            h, size = hashlib.blake2b(digest_size=16), 0
            while raw and not raw.endswith(b"\n"):
                h.update(raw)
                size += len(raw)
                raw = f.readline(1 << 20)
            rest = raw.rstrip(b"\r\n")
            h.update(rest)
            yield number, TooLong(size + len(rest), h.hexdigest())
            continue
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        if raw.strip():
            yield number, raw


def repeated_id(line: int, custom_id: str, first: int, source: str, digest: str = "") -> LineError:
    """The error of a line whose custom_id an earlier line (`first`) already uses."""
    return LineError(line, None, f"{source} line {line}: custom_id {_show(custom_id)} is already used on line "
                                 f"{first}; give every request its own custom_id", digest=digest)


def is_result_record(obj) -> bool:
    """A line of a run's results or errors file (it has "response"), not a request."""
    return isinstance(obj, dict) and "response" in obj and "method" not in obj and "body" not in obj


JSON_SPACE = " \t\n\r"  # the white space JSON allows between tokens (Python's str.strip takes more)


def parse_line(raw: bytes | str | TooLong, line: int, source: str = "requests.jsonl") -> BatchRequest | LineError:
    """One line -> `BatchRequest`, or `LineError` naming the first problem found."""
    if isinstance(raw, TooLong):
        return LineError(line, None, f"{source} line {line}: {raw.size:,} bytes, longer than any request can be "
                                     f"({MAX_LINE_BYTES >> 20} MiB); is the file one JSON object per line?",
                         digest=raw.digest)
    cid = None
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    raw_digest = _blake(data.strip())
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        return LineError(line, None, f"{source} line {line}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at "
                         f"offset {exc.start} of the line); save the file as UTF-8",
                         digest=raw_digest)
    text = text.rstrip("\r\n")  # so a column counts on this line
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_int=_int, object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, BadLine, RecursionError) as exc:
        odd = text[exc.pos] if isinstance(exc, json.JSONDecodeError) and exc.pos < len(text) else ""
        if isinstance(exc, json.JSONDecodeError) and text.strip(JSON_SPACE) and exc.pos >= len(text.rstrip(JSON_SPACE)):
            what = "the line ends before its JSON does: is it cut short, or is the file indented JSON?"
        elif odd.isspace() and odd not in JSON_SPACE:  # a form feed or a no-break space: not white space to JSON
            what = (f"U+{ord(odd):04X} at column {exc.colno}, which JSON does not take as white space; remove it "
                    "or write it inside a string")
        elif isinstance(exc, json.JSONDecodeError):
            what = f"{exc.msg.removesuffix(' at')} at column {exc.colno}"
            if exc.msg == "Extra data" and odd == "," and not text[exc.pos + 1:].strip(JSON_SPACE):
                what += ": a comma after the object (left from a JSON list?); remove it"
            elif exc.msg == "Extra data":  # `{...} {...}`, or lines ended by a lone \r (old Mac files)
                what += ": more than one JSON value; end each request's line with a newline (\\n)"
            elif exc.msg.startswith("Unexpected UTF-8 BOM"):  # files joined with cat, one saved with a BOM
                what = ("a byte-order mark (U+FEFF) starts the line (a file joined on with `cat`?); remove it, e.g. "
                        "sed -i 's/^\\xEF\\xBB\\xBF//' FILE")
        else:
            what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        return LineError(line, None, f"{source} line {line}: invalid JSON ({what}); each line must be one "
                                     "JSON object", digest=raw_digest)
    try:
        digest = request_digest(obj)
    except (UnicodeEncodeError, RecursionError):
        cid = obj.get("custom_id") if isinstance(obj, dict) else None
        cid = cid if isinstance(cid, str) and cid and _is_text(cid) else None
        return LineError(line, cid, f"{source} line {line}: a string holds a lone surrogate escape (such as "
                                    '"\\ud800"), which is not text; fix that \\u escape (a character beyond U+FFFF '
                                    'is a pair, e.g. "\\ud83d\\ude00")', digest=raw_digest)
    try:
        if not isinstance(obj, dict):
            hint = " (write one request per line, not a JSON list)" if isinstance(obj, list) else ""
            raise BadLine(f"expected a JSON object with {', '.join(TOP_FIELDS)}, got {_kind(obj)}{hint}")
        cid = obj.get("custom_id")
        if is_result_record(obj):
            cid = None
            raise BadLine("this is a result record (it has \"response\"), not a request; pass the requests file, "
                       "not a results or errors file")
        if "custom_id" not in obj:
            raise BadLine('"custom_id" is missing; give every request a unique string custom_id')
        if not isinstance(cid, str) or not cid:
            bad, cid = cid, None
            raise BadLine(f'"custom_id" must be a non-empty string, got {_show(bad)}')
        extra = sorted(set(obj) - set(TOP_FIELDS))
        if extra:
            raise BadLine(f"unknown field {_show(extra[0])}; a line holds only {', '.join(TOP_FIELDS)}")
        if "method" not in obj:
            raise BadLine('"method" is missing; it must be "POST"')
        if obj["method"] != "POST":
            raise BadLine(f'"method" must be "POST", got {_show(obj["method"])}')
        if "url" not in obj:
            raise BadLine(f'"url" is missing; use one of {", ".join(ENDPOINTS)}')
        url = obj["url"]
        if not isinstance(url, str) or url not in ENDPOINTS:
            raise BadLine(f'unknown "url" {_show(url)}; use one of {", ".join(ENDPOINTS)}')
        body = obj.get("body")
        if not isinstance(body, dict):
            raise BadLine(f'"body" must be a JSON object, got {_kind(body)}' if "body" in obj else '"body" is missing')
        return _parse_body(line, cid, ENDPOINTS[url], url, body, digest)
    except BadLine as exc:
        return LineError(line, cid, f"{source} line {line}: {exc}", digest=digest)


def request_digest(obj) -> str:
    """What a result record remembers of its request line: blake2b-128 of the line's JSON in
    canonical form (sorted keys, no spaces), so spacing and key order are not changes.
    Raises UnicodeEncodeError for a string holding a lone surrogate (not text)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return _blake(text.encode("utf-8"))


def _blake(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unique_keys(pairs: list) -> dict:
    """`json.loads`' object hook: a key twice in one object is `BadLine` (JSON's last-wins would
    drop a value the user wrote); shared with the trace reader."""
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise BadLine(f"the key {_show(dup)} appears twice in one object; keep one")
    return out


def _asks_nothing(key: str, value) -> bool:
    """`value` of the unsupported field `key` is None or its default (type and value alike: 0 is
    not False)."""
    return key in _DEFAULT_ONLY and (value is None or any(type(value) is type(d) and value == d
                                                          for d in _DEFAULT_ONLY[key]))


def _parse_body(line: int, cid: str, kind: str, url: str, body: dict, digest: str = "") -> BatchRequest:
    allowed = BODY_FIELDS[kind]
    for key in body:
        if key not in allowed:
            if key == "prompt" and kind == "chat":
                raise BadLine(f'"prompt" is not a field of {url}; send "messages", or use url /v1/completions')
            if key == "messages" and kind == "completion":
                raise BadLine(f'"messages" is not a field of {url}; send "prompt", or use url /v1/chat/completions')
    # every one named: a fix per reread was one field at a time
    others = [k for k in body if k not in allowed and not _asks_nothing(k, body[k])]
    if others:
        which = ", ".join(_show(k) for k in others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        defaults = [f"{_show(k)}: {' or '.join([*(json.dumps(d) for d in _DEFAULT_ONLY[k]), 'null'])}"
                    for k in others if k in _DEFAULT_ONLY]
        also = f" (taken only as what OpenAI does without them: {'; '.join(defaults[:4])})" if defaults else ""
        raise BadLine(f'unsupported body field{"s" if len(others) > 1 else ""} {which}; supported: '
                      f'{", ".join(sorted(allowed))}{also}')
    messages = prompt = parts = None
    if kind == "chat":
        messages, parts = _messages(body)
    else:
        prompt = _prompt(body)
    max_tokens = _max_tokens(body)
    sampling: dict = {}
    for key, (name, lo, hi, closed_lo, text) in _NUMBER_FIELDS.items():
        if key in body and body[key] is not None:
            v = body[key]
            ok = _is_number(v) and (lo <= v if closed_lo else lo < v) and v <= hi
            if not ok:
                raise BadLine(f'"{key}" must be {text}, got {_show(v)}')
            sampling[name] = float(v)
    if body.get("top_k") is not None:
        v = body["top_k"]
        if not _is_int(v) or not (v == -1 or v >= 1):
            raise BadLine(f'"top_k" must be a positive integer (or -1 for all tokens), got {_show(v)}')
        sampling["top_k"] = -1 if v > TOP_K_ALL else v  # beyond any vocabulary: all tokens (SGLang holds int32)
    if body.get("seed") is not None:
        v = body["seed"]
        if not _is_int(v) or not 0 <= v <= MAX_SEED:
            raise BadLine(f'"seed" must be an integer from 0 to 2**63 - 1, got {_show(v)}')
        sampling["sampling_seed"] = v
    if body.get("stop") is not None:
        sampling["stop"] = _stop(body["stop"])
    if body.get("ignore_eos") is not None:
        if not isinstance(body["ignore_eos"], bool):
            raise BadLine(f'"ignore_eos" must be true or false, got {_show(body["ignore_eos"])}')
        sampling["ignore_eos"] = body["ignore_eos"]
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise BadLine(f'"n" must be 1 (one completion per request line), got {_show(body["n"])}')
    if body.get("stream") not in (None, False):
        raise BadLine(f'"stream" must be false in a batch, got {_show(body["stream"])}')
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadLine(f'"model" must be a string, got {_show(model)}')
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise BadLine(f'"user" must be a string, got {_show(body["user"])}')
    return BatchRequest(line, cid, kind, messages, prompt, max_tokens, sampling, model, digest, parts)


def _messages(body: dict) -> tuple[tuple[dict, ...], tuple | None]:
    """The messages as SGLang's server gives them to a template that takes text, and the text
    parts of each content list (None where no message has one)."""
    if "messages" not in body:
        raise BadLine('"messages" is missing; a chat request needs a list of {"role", "content"} messages')
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise BadLine(f'"messages" must be a non-empty list of {{"role", "content"}} objects, got {_show(msgs)}')
    out, parts_of = [], []
    for i, m in enumerate(msgs):
        where = f'"messages"[{i}]'
        if not isinstance(m, dict):
            raise BadLine(f'{where} must be an object with "role" and "content", got {_kind(m)}')
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadLine(f'{where}: "role" must be one of {", ".join(sorted(ROLES))}, got {_show(role)}')
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise BadLine(f'{where}: unsupported field {_show(extra[0])} (tools and images are not supported)')
        content, parts = m.get("content"), None
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise BadLine(f'{where}: "content"[{j}] must be {{"type": "text", "text": "..."}} (only text is '
                               "supported)")
                parts.append(part["text"])
            content = " ".join(parts)  # SGLang's server joins text parts with a space for a text template
            parts = tuple(parts)
        if not isinstance(content, str):
            raise BadLine(f'{where}: "content" must be a string, got {_show(content)}')
        msg = {"role": "system" if role == "developer" else role, "content": content}
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise BadLine(f'{where}: "name" must be a string, got {_show(name)}')
        if name is not None and role != "user":  # SGLang's server keeps a name on every role but the user's
            msg["name"] = name
        out.append(msg)
        parts_of.append(parts)
    return tuple(out), (tuple(parts_of) if any(p is not None for p in parts_of) else None)


def _prompt(body: dict) -> str | tuple[int, ...]:
    if "prompt" not in body:
        raise BadLine('"prompt" is missing; a completion request needs a prompt string')
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a one-element batch of prompts is one prompt
    if isinstance(p, str):
        if not p:
            raise BadLine('"prompt" is empty; give the text to complete')
        return p
    if isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p):
        return tuple(p)
    if isinstance(p, list) and p and all(isinstance(t, (str, list)) for t in p):
        raise BadLine(f'"prompt" holds {len(p)} prompts; put one prompt per line, each with its own custom_id')
    raise BadLine(f'"prompt" must be a non-empty string or a list of token ids, got {_show(p)}')


def _max_tokens(body: dict) -> int | None:
    values = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    for key, v in values.items():
        if not _is_int(v) or v < 1:
            raise BadLine(f'"{key}" must be a positive integer, got {_show(v)}')
    if len(set(values.values())) > 1:
        raise BadLine('"max_tokens" and "max_completion_tokens" disagree; give one of them')
    return next(iter(values.values()), None)


def _stop(v) -> list[str]:
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadLine(f'"stop" must be a non-empty string or a list of them, got {_show(v)}')
    if len(stops) > MAX_STOP:
        raise BadLine(f'"stop" has {len(stops)} strings; at most {MAX_STOP} are supported')
    return stops


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:  # Python refuses to convert such a string (past 4,300 digits) and no field takes it
        raise BadLine(f"a number of {digits:,} digits; no field takes one that large")
    return int(text)


def _no_constant(name: str):
    raise BadLine(f"{name} is not valid JSON")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _show(v, limit: int = 60) -> str:
    text = json.dumps(v, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."
