"""Loaders for the real traces in `shared/data`, and the `Record` every workload is made of.

- Azure LLM inference traces (code, conversation): prompt and output token counts.
- arXiv summarization (Llama-2 token counts).
- MMLU 5-shot prompts: one shared prefix per subject (instruction + the 5 dev examples), the
  test question as the unshared tail. Token counts use the approximation `approx_tokens`
  (UTF-8 bytes / 4, rounded up), since no tokenizer is needed by the core.

The data directory is `$BLENDSERVE_DATA`, else `shared/data` next to the project checkout.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..core.specs import whole_number

SOURCES = {
    "traces/AzureLLMInferenceTrace_code.csv": "Azure/AzurePublicDataset, data/AzureLLMInferenceTrace_code.csv",
    "traces/AzureLLMInferenceTrace_conv.csv": "Azure/AzurePublicDataset, data/AzureLLMInferenceTrace_conv.csv",
    "traces/arxiv_summarization_llama2_tokens.csv":
        "microsoft/vidur, data/processed_traces/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
    "mmlu": "hendrycks/test, data/{dev,test}/",
}


class Record(NamedTuple):
    """One request of a workload: a length-only prompt (prefix groups + an unshared tail) or,
    with `tokens`, a token-id prompt (then `prefix` is empty and `prompt_len == len(tokens)`)."""

    rid: Any
    prompt_len: int
    prefix: tuple  # ((group_id, n_tokens), ...), outermost first
    output_len: int
    kind: str = ""
    tokens: tuple | None = None  # token ids of the prompt, when known
    max_tokens: int | None = None  # the request's own output limit (a user's file), if any
    exact: bool = False  # it generates exactly max_tokens (ignore_eos in a user's file): no scenario shortens it


def data_dir() -> Path:
    """`$BLENDSERVE_DATA`, else the first `shared/data` found beside the checkout or one of its
    parent folders (a worktree inside the project folder finds the project's data)."""
    env = os.environ.get("BLENDSERVE_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for folder in (*here.parents, *Path.cwd().resolve().parents):
        if (folder / "shared" / "data").is_dir():
            return folder / "shared" / "data"
    return here.parents[1] / "shared" / "data"


def _path(rel: str) -> Path:
    path = data_dir() / rel
    if not path.exists():
        src = next((v for k, v in SOURCES.items() if rel.startswith(k)), "see shared/data/README.md")
        raise FileNotFoundError(f"data file {path} is missing; it comes from {src}. "
                                f"Set BLENDSERVE_DATA to the folder that holds traces/ and mmlu/.")
    return path


def approx_tokens(text: str) -> int:
    """Token count approximation: UTF-8 bytes / 4, rounded up (at least 1)."""
    return max(1, math.ceil(len(text.encode("utf-8")) / 4))


MAX_TRACE_TOKENS = 10_000_000  # one request's token count in a trace: beyond any model's context
CSV_FIELD_LIMIT = 64 * 2**20  # one CSV field (a trace's prompt-text column, an MMLU question)


def load_azure(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_lens, output_lens) of the Azure `code` or `conv` trace."""
    if kind not in ("code", "conv"):
        raise ValueError(f"Azure trace kind must be 'code' or 'conv', got {kind!r}")
    return read_counts(_path(f"traces/AzureLLMInferenceTrace_{kind}.csv"), "ContextTokens", "GeneratedTokens")


def load_arxiv() -> tuple[np.ndarray, np.ndarray]:
    return read_counts(_path("traces/arxiv_summarization_llama2_tokens.csv"), "num_prefill_tokens", "num_decode_tokens")


def csv_rows(path: Path, encoding: str = "utf-8-sig"):
    """(line number, row) of each row of the CSV file `path`, in order: the line the row starts on
    (a quoted field may hold line breaks). A file that cannot be read as CSV text (a folder,
    compressed or not UTF-8, a field over `CSV_FIELD_LIMIT`) is a ValueError naming the file, the line
    and the fix."""
    ended = 0  # the last line of the rows read so far
    if csv.field_size_limit() < CSV_FIELD_LIMIT:  # csv's own 128 KiB refuses traces exported with their prompt text
        csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with open(path, newline="", encoding=encoding) as f:
            reader = csv.reader(f)
            for row in reader:
                yield ended + 1, row
                ended = reader.line_num
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory; a CSV file belongs there") from None
    except UnicodeDecodeError as exc:  # its offset is within the chunk the decoder was given, not the file
        raise ValueError(f"{path} line {first_bad_line(path)}: not UTF-8 text (byte "
                         f"{exc.object[exc.start:exc.start + 1]!r}); a CSV file here is plain text: decompress it or "
                         "convert it to UTF-8") from None
    except csv.Error as exc:
        where = f"line {ended + 1}" if reader.line_num == ended + 1 else f"the row of lines {ended + 1}-{reader.line_num}"
        if "field limit" in str(exc):
            raise ValueError(f"{path} {where}: a field over {CSV_FIELD_LIMIT // 2**20} MiB, the most this reader "
                             "takes (often an unclosed double quote that runs on to the end of the file); close the "
                             "quote, or shorten or delete that field") from None
        raise ValueError(f"{path} {where}: not a CSV row ({exc}); fix or delete that row") from None


def first_bad_line(path: Path) -> int:
    """The number of the first line of `path` that is not UTF-8 (text mode decodes ahead of the lines)."""
    line_no = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return line_no
    return line_no


def csv_header(rows) -> list[str]:
    """The first row of `rows` (`csv_rows`) that is not blank, its cells stripped: a CSV file's
    header (blank lines before it are skipped, as blank rows after it are); [] when there is none."""
    for _, row in rows:
        if any(cell.strip() for cell in row):
            return [h.strip() for h in row]
    return []


def read_counts(path: Path, prompt_col: str, output_col: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_lens, output_lens) from the two named columns of a CSV trace, wherever they stand
    among others; blank rows skipped; the first `n` rows when given (the rest is not read). ValueError
    naming the file, row and column for a missing column, a count that is not a whole number from
    0 to `MAX_TRACE_TOKENS`, or no rows."""
    cols = (prompt_col, output_col)
    rows_in = csv_rows(path)
    header = csv_header(rows_in)
    missing = [c for c in cols if c not in header]
    if missing:
        rows_in.close()
        raise ValueError(f"{path}: no column {' or '.join(missing)} in its header ({','.join(header) or 'empty'}); "
                         f"a trace needs the columns {prompt_col} and {output_col} (token counts)")
    at = [header.index(c) for c in cols]
    width, last = len(header), max(at)

    def counts(line: int, row: list[str]) -> tuple[int, int]:
        if len(row) > width and any(cell.strip() for cell in row[width:]):  # empty trailing cells are harmless
            raise ValueError(f"{path} line {line}: {len(row)} cells under a header of {width} columns, so the "
                             "columns would shift; a value holding a comma must be in double quotes (\"1,5\"): "
                             "quote it, or fix or delete that row")
        if len(row) <= last and "\n" in row[-1]:
            raise ValueError(f"{path} line {line}: a double quote opened in this row is not closed, so the row "
                             "runs on over the lines after it; close the quote, or fix or delete that row")
        return tuple(_count(path, line, c, row[i] if i < len(row) else "") for c, i in zip(cols, at))

    try:
        rows = [counts(line, row) for line, row in
                itertools.islice(((ln, r) for ln, r in rows_in if any(cell.strip() for cell in r)), n)]
    finally:
        rows_in.close()
    if not rows:
        raise ValueError(f"{path} holds no rows under its header; a trace needs at least one request")
    arr = np.array(rows, dtype=np.int64)
    return arr[:, 0], arr[:, 1]


def token_count(value) -> int | None:
    """`value` (text or a number) as one request's token count: a whole number from 0 to
    `MAX_TRACE_TOKENS`; None for anything else (NaN, inf, a fraction, a negative, a bool)."""
    n = whole_number(value)
    return n if n is not None and 0 <= n <= MAX_TRACE_TOKENS else None


def _count(path: Path, line: int, col: str, text: str) -> int:
    v = token_count(text)
    if v is None:
        raise ValueError(f"{path.name} line {line}: {col} must be a whole token count from 0 to "
                         f"{MAX_TRACE_TOKENS:,}, got {text!r}; fix or delete that row")
    return v


def _mmlu_rows(path: Path, with_answer: bool) -> list[str]:
    """The examples of an MMLU CSV file (question, 4 choices, answer), blank rows skipped."""
    need = 6 if with_answer else 5
    out = []
    for line, row in csv_rows(path, "utf-8"):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < need:
            raise ValueError(f"{path.name} line {line}: {len(row)} columns, an MMLU row has "
                             f"{need} (question, choices A-D{', answer' if with_answer else ''}); fix that row")
        q, a, b, c, d = row[:5]
        text = f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
        out.append(text + (f" {row[5]}\n\n" if with_answer else ""))
    return out


def load_mmlu() -> dict[str, tuple[int, list[int]]]:
    """subject -> (5-shot prefix tokens, [tokens of each test question])."""
    root = _path("mmlu")
    out = {}
    for dev in sorted((root / "dev").glob("*_dev.csv")):
        subject = dev.name[: -len("_dev.csv")]
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        prefix = approx_tokens(header + "".join(_mmlu_rows(dev, True)))
        test = root / "test" / f"{subject}_test.csv"
        if not test.exists():
            raise FileNotFoundError(f"{test} is missing: every MMLU subject with a dev file needs its test file")
        questions = [approx_tokens(t) for t in _mmlu_rows(test, False)]
        if not questions:
            raise ValueError(f"{test} holds no questions; add them or remove {dev.name}")
        out[subject] = (prefix, questions)
    if not out:
        raise FileNotFoundError(f"no MMLU dev files under {root / 'dev'}")
    return out


SYSTEM_PROMPT_TOKENS = 64  # every class of request runs behind its own system prompt of this length
