"""`blendserve run`: the offline batch job (OpenAI Batch API JSONL in, results JSONL out).

- `requests.py` — reads and validates input lines into `BatchRequest`s or `LineError`s;
- `prompts.py` — chat template, tokenization, context-length checks (`Prepared`);
- `results.py` — result and error records, the append-only writer, the resume scan;
- `progress.py` — the progress bar and the end-of-run summary;
- `runner.py` — the SGLang engine in-process, requests submitted at once, results written as
  they complete;
- `cli.py` — the command: fail-fast checks, then the steps above in order.

Only `runner.py` imports sglang; the rest is plain Python (the tokenizer is passed in).
"""
