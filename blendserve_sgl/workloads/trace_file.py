"""A user's own trace file as workload records: what `--workload PATH` reads in `blendserve
simulate`, `blendserve plan` and `bench/paper_traces.py`.

Two formats, told apart by the file's first character:
- CSV with a header naming one known pair of token-count columns (`TRACE_COLUMNS`: the Azure
  LLM inference traces, Vidur's processed traces, BurstGPT and the common `input_tokens` /
  `output_tokens` spellings; matched as written, a pair in another case named in the error; with
  two pairs the first is read and the other named on stderr); other columns are ignored.
  Lengths only: every prompt is unshared.
- JSON lines in the Mooncake trace format: `input_length`, `output_length` and optionally
  `hash_ids`, one id per block of `block_size` prompt tokens (512 in the published traces), equal
  ids for equal prefixes. Every block becomes a shared prefix group, so requests that share
  blocks share a prefix in the tree and in the radix cache: identical prompts share all of it
  (the engine still computes the last token). The last block is often partial: its group is
  named by its id and its token count, so it is shared only with the same partial block, never
  with a full block of the same id (an inconsistent trace). Prompt tokens beyond the hashed
  blocks are the request's own tail; when fewer than half the rows' ids cover their whole prompt
  (a trace of larger blocks read at this size), the reader says so on stderr. A block size
  given for a CSV, which has no ids, is refused. Ids are integers (Mooncake's) or strings, each equal only
  to itself: 1 and "1" are two blocks, as they are two JSON values. A key twice in one line is
  refused (which one counts would be a guess).

Requests are taken in file order (the first `n` when given). An output of 0 tokens counts as 1
and a prompt of 0 tokens as 1: an engine writes at least one token and reads at least one (their
count printed to stderr: a trace such as BurstGPT logs failed requests with 0 response tokens).
Bad rows raise ValueError naming the file, line and field; so does a CSV header that names a
column it reads twice.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

from ..batch.requests import BadLine, LineError, unique_keys, compression, wide_text
from .data import MAX_TRACE_TOKENS, Record, csv_header, csv_rows, first_bad_line, read_counts, token_count

TRACE_COLUMNS = (  # (prompt column, output column), the first pair a header holds is read
    ("ContextTokens", "GeneratedTokens"),  # Azure LLM inference traces 2023 / 2024
    ("num_prefill_tokens", "num_decode_tokens"),  # Vidur's processed traces
    ("Request tokens", "Response tokens"),  # BurstGPT
    ("input_tokens", "output_tokens"),
    ("prompt_tokens", "completion_tokens"),
    ("input_length", "output_length"),
    ("prompt_size", "token_size"),  # splitwise-sim's traces
)
MOONCAKE_BLOCK = 512  # tokens per hash id in the published Mooncake traces
HEADER_SHOWN = 200  # characters of a CSV header an error quotes


def is_trace_file(spec: str) -> bool:
    """Whether a `--workload` value names a trace file (a path that exists or is a link, one with
    a folder in it, or one ending in .csv / .jsonl / .json), as opposed to a built-in workload name."""
    path = Path(spec)
    return (path.exists() or path.is_symlink() or "/" in spec
            or spec.lower().endswith((".csv", ".jsonl", ".json")))


def _column_pairs(header: list[str]) -> list[tuple[str, str]]:
    """Every pair of `TRACE_COLUMNS` a CSV header names, in the table's order (the first is read)."""
    return [p for p in TRACE_COLUMNS if p[0] in header and p[1] in header]


def trace_or_file(spec: str, n: int, cost, seed: int = 0) -> tuple[str, list[Record], dict]:
    """(name, records, counts) for a trace analog's name (`recipes.trace`, n requests; counts per
    class) or a trace file (its stem, its first n rows but those beyond `cost`'s model's context:
    `within_context`; counts: the file, its requests and `beyond_context`): what the benchmarks'
    `--traces` take."""
    if is_trace_file(spec):
        records, beyond = within_context(load_trace_file(spec, n), cost.model.max_context, spec, cost.model.name,
                                         "simulated")
        return Path(spec).stem, records, {"file": spec, "requests": len(records), "beyond_context": len(beyond)}
    from .recipes import trace

    records, report = trace(spec, n, cost, seed)
    return spec, records, report.counts


def within_context(records: list[Record], context: int, source: str, model_name: str,
                   verb: str = "planned") -> tuple[list[Record], list]:
    """(records the model's context holds, a `LineError` per other one: row number, tokens, the
    fix). A trace's rows are token counts with no model of their own: a prompt of 191,378 tokens
    (Mooncake) cannot run on a 131,072-token model, nor a prompt over SGLang's input limit
    (`batch.prompts.input_limit`), nor a row whose output does not fit beside its prompt (SGLang
    generates at most `batch.prompts.output_room`), all of which `run` refuses line by line; none of
    them runs, so none is planned or simulated (`verb`)."""
    from ..batch.prompts import OUTPUT_MARGIN, input_limit, output_room

    limit, fix = input_limit(context), f"{'plan' if verb == 'planned' else 'simulate'} a model with a longer context, " \
                                        "or drop the row"
    kept, bad = [], []
    for row, r in enumerate(records, 1):
        where = f"{Path(source).name} data row {row}"  # rows counted without the header and blank lines
        if r.prompt_len > limit:
            bad.append(LineError(row, str(r.rid), f"{where}: the prompt is {r.prompt_len:,} tokens, "
                                 f"{'at least' if r.prompt_len >= context else 'too long for'} {model_name}'s context "
                                 f"of {context:,} tokens (SGLang takes prompts of at most {limit:,}); not {verb} ({fix})"))
        elif r.output_len > output_room(context, r.prompt_len):
            bad.append(LineError(row, str(r.rid), f"{where}: the prompt of {r.prompt_len:,} tokens and the output of "
                                 f"{r.output_len:,} need {r.prompt_len + r.output_len:,} tokens, more than SGLang runs in "
                                 f"{model_name}'s context of {context:,} tokens (it keeps {OUTPUT_MARGIN}); not {verb} "
                                 f"({fix})"))
        else:
            kept.append(r)
    if not kept:
        raise ValueError(f"{source}: no request fits {model_name}'s context of {context:,} tokens "
                         f"({len(bad):,} request{'s' if len(bad) != 1 else ''}, the first {records[0].prompt_len:,} prompt and "
                         f"{records[0].output_len:,} output tokens)")
    return kept, bad


def looks_like_trace(path) -> bool:
    """Whether a file reads as a trace of token counts (its first line a JSON object with
    input_length and output_length, or a CSV header with a known column pair) rather than
    requests: for a hint where a trace is passed as a batch file."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            first = next((line for line in f if line.strip()), "")
    except OSError:
        return False
    try:
        row = json.loads(first)
        return isinstance(row, dict) and "input_length" in row and "output_length" in row
    except ValueError:
        return bool(_column_pairs([h.strip() for h in next(csv.reader([first]), [])]))


def load_trace_file(path, n: int | None = None, block_size: int | None = None) -> list[Record]:
    """Records from a CSV or Mooncake-style JSONL trace (module docstring); the first `n`.
    `block_size`: tokens per hash id (None: `MOONCAKE_BLOCK`); given for a CSV, which has no hash
    ids, it is refused (it would change nothing, silently)."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():  # a dangling link, or a loop of links
            raise FileNotFoundError(f"trace file {path} is a symbolic link that leads to no file "
                                    f"({os.readlink(path)}); pass the trace's own path")
        raise FileNotFoundError(f"trace file {path} does not exist; pass the path of a CSV or JSONL trace")
    if path.is_dir():
        raise ValueError(f"trace {path} is a directory; pass the path of a trace file in it")
    if not path.is_file():
        raise ValueError(f"trace {path} is not a regular file (a trace is read from a file, not a pipe); save it to "
                         "a file first (e.g. zcat trace.csv.gz > trace.csv) and pass its path")
    if n is not None and n < 1:
        raise ValueError(f"the number of requests to take from {path} must be >= 1, got {n}")
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise ValueError(f"cannot read trace {path} ({exc.strerror}); check the path and its permissions") from None
    packed = compression(head)
    if packed:
        raise ValueError(f"trace {path} is {packed}-compressed; decompress it first")
    wide = wide_text(head)
    if wide:
        raise ValueError(f"trace {path} is {wide} text, not UTF-8; save it as UTF-8 (`iconv -f {wide} -t UTF-8`)")
    first = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")[:1]
    if not first:
        raise ValueError(f"trace {path} holds no requests (it is empty or blank); a trace needs at least one row")
    if first == "[":
        raise ValueError(f"trace {path} starts with '[': a JSON list; a JSONL trace has one JSON object per line "
                         "(input_length, output_length, optionally hash_ids): convert it, e.g. "
                         f"jq -c '.[]' {path} > {path.stem}.lines.jsonl")  # never the input's own name
    if first != "{" and block_size is not None:
        raise ValueError(f"--block-size {block_size} is the hash-id block of a Mooncake-format JSONL trace; {path} "
                         "is a CSV of token counts (no hash ids, every prompt unshared): drop --block-size")
    block_size = block_size or MOONCAKE_BLOCK
    zeros = [0, 0]  # rows whose prompt, whose output was 0 tokens
    records = _jsonl(path, n, block_size, zeros) if first == "{" else _csv(path, n, zeros)
    if not records:
        raise ValueError(f"trace {path} holds no requests; a trace needs at least one row")
    hashed = [r for r in records if r.prefix]
    covered = sum(len(r.prefix) == math.ceil(r.prompt_len / block_size) for r in hashed)
    if covered < len(hashed) / 2:  # a trace of larger blocks read at this size: its sharing cut short
        print(f"{path}: the hash_ids cover the whole prompt in {covered:,} of the {len(hashed):,} rows that have "
              f"them, at {block_size} tokens a block; if the trace's ids stand for larger blocks, pass its block "
              "size with --block-size (the prefix sharing read now is less than the trace's)", file=sys.stderr)
    if any(zeros):
        print(f"{path}: {zeros[0]:,} rows with a 0-token prompt and {zeros[1]:,} with a 0-token output run as 1 "
              "token each (an engine reads and writes at least one; a trace often logs its failed requests so): "
              "delete those rows to leave them out", file=sys.stderr)
    return records


def _csv(path: Path, n: int | None, zeros: list) -> list[Record]:
    rows = csv_rows(path)
    header = csv_header(rows)
    rows.close()
    pairs = _column_pairs(header)
    if not pairs:
        known = "; ".join(f"{a},{b}" for a, b in TRACE_COLUMNS)
        shown = ",".join(header)
        shown = shown if len(shown) <= HEADER_SHOWN else f"{shown[:HEADER_SHOWN]}... ({len(shown):,} characters)"
        lower = {h.lower(): h for h in header}
        near = next(((lower[a.lower()], lower[b.lower()], a, b) for a, b in TRACE_COLUMNS
                     if a.lower() in lower and b.lower() in lower), None)
        if near:  # the names in another case: said exactly (the columns are matched as written)
            raise ValueError(f"{path}: its header names {near[0]},{near[1]}; the columns are read by their exact "
                             f"names: rename them {near[2]},{near[3]}")
        raise ValueError(f"{path}: its header ({shown or 'empty'}) names no known pair of token-count "
                         f"columns; rename the prompt and output columns to one of: {known}")
    pair, others = pairs[0], pairs[1:]
    if others:  # the first pair is read; which one was meant is said, not guessed silently
        print(f"{path}: reads the token counts of {pair[0]},{pair[1]}; the header also names "
              f"{'; '.join(f'{a},{b}' for a, b in others)} (rename a pair to read another)", file=sys.stderr)
    for column in pair:  # which of two equal names holds the counts would be a guess
        at = [i + 1 for i, h in enumerate(header) if h == column]
        if len(at) > 1:
            raise ValueError(f"{path}: its header names the column {column!r} {len(at)} times (columns "
                             f"{', '.join(map(str, at))}); keep one {column} column: rename or delete the others")
    prompts, outputs = read_counts(path, *pair, n)
    zeros[0] += int((prompts == 0).sum())
    zeros[1] += int((outputs == 0).sum())
    stem = path.stem
    return [Record(f"{stem}-{i}", max(1, int(p)), (), max(1, int(o)), stem) for i, (p, o) in
            enumerate(zip(prompts, outputs))]


def _whole(path: Path, line: int, field: str, value) -> int:
    """A JSON number that is a token count (`data.token_count`; text is not one here)."""
    n = token_count(value) if isinstance(value, (int, float)) else None
    if n is None:
        raise ValueError(f"{path.name} line {line}: {field} must be a whole number from 0 to "
                         f"{MAX_TRACE_TOKENS:,}, got {value!r}; fix or delete that line")
    return n


def _jsonl(path: Path, n: int | None, block_size: int, zeros: list) -> list[Record]:
    out: list[Record] = []
    line_no = 0
    try:
        with open(path, encoding="utf-8-sig", errors="strict") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if n is not None and len(out) >= n:
                    break
                _jsonl_row(path, line_no, line, block_size, out, zeros)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path.name} line {first_bad_line(path)}: not UTF-8 text ({exc.reason}); convert the "
                         "trace to UTF-8") from None
    return out


def _jsonl_row(path: Path, line_no: int, line: str, block_size: int, out: list, zeros: list) -> None:
    """One JSONL trace line as a Record appended to `out` (its 0 counts added to `zeros`);
    ValueError naming the line."""
    try:
        row = json.loads(line, object_pairs_hook=unique_keys)  # a key twice: the batch reader's refusal
    except RecursionError:
        raise ValueError(f"{path.name} line {line_no}: JSON nested too deeply; fix or delete that line") from None
    except BadLine as exc:  # raised here only by unique_keys
        raise ValueError(f"{path.name} line {line_no}: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
        why = "a number of more than 4,300 digits" if "integer string conversion" in str(exc) else str(exc)
        raise ValueError(f"{path.name} line {line_no}: not a JSON object ({why}); fix or delete that line") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path.name} line {line_no}: a trace line must be a JSON object with input_length "
                         f"and output_length, got {type(row).__name__}")
    for field in ("input_length", "output_length"):
        if field not in row:
            hint = ""
            if "body" in row or "custom_id" in row or "messages" in row or "prompt" in row:
                hint = (f"; this is a file of requests, not a trace of token counts: `blendserve plan {path}` "
                        "tokenizes and simulates it")
            raise ValueError(f"{path.name} line {line_no}: no {field!r}; each line needs input_length and "
                             f"output_length (token counts){hint}")
    given, o = (_whole(path, line_no, f, row[f]) for f in ("input_length", "output_length"))
    zeros[0] += given == 0
    zeros[1] += o == 0
    p, o = max(1, given), max(1, o)
    ids = row.get("hash_ids")
    ids = [] if ids is None else ids
    if not isinstance(ids, list):
        raise ValueError(f"{path.name} line {line_no}: hash_ids must be a list of block ids, got "
                         f"{type(ids).__name__}")
    if len(ids) > p:  # more blocks than tokens: no block size reads this line
        raise ValueError(f"{path.name} line {line_no}: {len(ids):,} hash_ids for input_length {given:,}, more "
                         "ids than prompt tokens; fix or delete that line")
    if len(ids) > math.ceil(p / block_size):
        raise ValueError(f"{path.name} line {line_no}: {len(ids):,} hash_ids for input_length {given:,}, more than "
                         f"its {math.ceil(p / block_size):,} blocks of {block_size} tokens; the block size "
                         "does not match the trace: pass the trace's block size with --block-size")
    for h in ids:
        if isinstance(h, bool) or not isinstance(h, (int, str)):
            raise ValueError(f"{path.name} line {line_no}: hash_ids items must be integers or strings, got "
                             f"{h!r}; fix or delete that line")
    prefix = [(f"h{h!r}", block_size) for h in ids]  # h1 for 1, h'1' for "1": two blocks
    if ids and p < len(ids) * block_size:  # a partial last block: h1/300 (a str id's repr ends in a quote)
        last = p - (len(ids) - 1) * block_size
        prefix[-1] = (f"{prefix[-1][0]}/{last}", last)
    prefix = tuple(prefix)
    out.append(Record(f"{path.stem}-{line_no}", p, prefix, o, path.stem))
