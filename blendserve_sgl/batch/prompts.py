"""From a validated request to the token ids the engine runs, checked against the context.

Chat requests go through the model's chat template exactly as SGLang's OpenAI server does it:
the template renders text with the generation prompt, which is encoded without adding special
tokens again (the template holds them). Completion prompts are encoded as SGLang's tokenizer
manager encodes text (`tokenizer.encode(text)`); token-id prompts are taken as they are, after
a vocabulary check. The engine then receives `input_ids`, so `usage.prompt_tokens` is the
length of exactly what was checked here.

Context rule (SGLang's own): the prompt must be shorter than the scheduler's input limit,
context - 1 - `INPUT_MARGIN` tokens (0.5.23's `max_req_input_len`; a smaller KV pool lowers it
further, which only the engine knows), and max_tokens at most what the scheduler lets a request
generate, context - 2 - prompt (`output_room`: it cuts max_new_tokens to max_req_len - prompt - 1,
max_req_len = context - 1, silently: a request asking more would end early as if at its limit).
A request without max_tokens gets the run's default, capped to that room. A KV pool smaller than
the context lowers both; the engine's own pool is checked once it runs (`runner.engine_room`). Any tokenizer with `encode(text, add_special_tokens=...)`, `apply_chat_template(...,
tokenize=False, add_generation_prompt=True)`, `chat_template` and `len()` works (tests pass
small stand-ins).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .requests import BatchRequest, LineError


@dataclass(frozen=True, slots=True)
class Prepared:
    request: BatchRequest
    input_ids: list[int]
    max_tokens: int  # what the engine may generate (the request's, or the default capped to the context)

    @property
    def sampling_params(self) -> dict:
        return {**self.request.sampling, "max_new_tokens": self.max_tokens}


def prepare(req: BatchRequest, tokenizer, context_len: int, default_max_tokens: int,
            source: str = "requests.jsonl", limit: int | None = None) -> Prepared | LineError:
    """Tokenize `req` and check it against `context_len` and the token ids the model has (`limit`,
    see `id_limit`; default: the tokenizer's size); a `LineError` names what to change (also when
    the tokenizer itself fails on this request: one line never stops the batch)."""
    too_long = beyond_context(req, tokenizer, context_len, source)
    if too_long is not None:
        return too_long
    encoded = encode(req, tokenizer, source, limit)
    if isinstance(encoded, LineError):
        return encoded
    ids, what = encoded
    max_tokens = check_context(req, len(ids), what, context_len, default_max_tokens, source)
    return max_tokens if isinstance(max_tokens, LineError) else Prepared(req, ids, max_tokens)


def encode(req: BatchRequest, tokenizer, source: str = "requests.jsonl",
           limit: int | None = None) -> tuple[list[int], str] | LineError:
    """The prompt's token ids and how error messages name it (see `render`), before any
    context check; a `LineError` when the template or the tokenizer rejects the request, or when
    its text encodes to an id the model does not have (`limit`, see `id_limit`)."""
    try:
        rendered = render(req, tokenizer, source, limit)
        if isinstance(rendered, LineError):
            return rendered
        text, what = rendered
        ids = list(req.prompt) if text is None else list(tokenizer.encode(text, add_special_tokens=req.kind != "chat"))
    except Exception as exc:  # noqa: BLE001 (tokenizers raise TypeError, ValueError, ...)
        return tokenizer_failure(req, source, exc)
    checked = text_limit(tokenizer, limit)
    beyond = None if checked is None else outside_model(req, max(ids, default=-1), what, checked, source)
    return beyond if beyond is not None else (ids, what)


def id_limit(tokenizer, model_dir: str | Path | None = None) -> int:
    """The token ids a prompt may hold: [0, limit), the tokenizer's ids that the model's embedding
    has (config.json's `vocab_size` in `model_dir`). A tokenizer given added tokens without the
    embedding resized has more ids than the model; SGLang's forward pass raises on such an id, which
    ends the engine with every request in it."""
    limit = len(tokenizer)
    if model_dir is not None:
        from ..core.specs import vocab_size

        rows = vocab_size(str(Path(model_dir) / "config.json"))
        limit = min(limit, rows) if rows else limit
    return limit


def text_limit(tokenizer, limit: int | None) -> int | None:
    """The limit the ids text encodes to are checked against: `limit` where the model's embedding is
    smaller than the tokenizer (`id_limit`), else None. Elsewhere a tokenizer's ids are its own (and
    the byte-count stand-in of `plan`'s presets gives ids that only count bytes)."""
    return limit if limit is not None and limit < len(tokenizer) else None


def outside_model(req: BatchRequest, top: int, what: str, limit: int,
                  source: str = "requests.jsonl") -> LineError | None:
    """The error of a prompt whose largest token id, `top`, the model does not have (see `id_limit`),
    or None."""
    if top < limit:
        return None
    return LineError(req.line, req.custom_id, f"{source} line {req.line}: {what} encodes to token id {top}, which "
                                              f"the model does not have (its embedding holds {limit} tokens, "
                                              'config.json "vocab_size"): the tokenizer has tokens added after the '
                                              "model was trained; remove that token's text from the prompt")


BYTES_MARGIN = 4  # a normalizer may map several bytes of text to one byte of a token (NFKC: full-width letters)


@functools.lru_cache(maxsize=8)
def max_token_bytes(tokenizer) -> int:
    """The longest token's text in UTF-8 bytes (0 when the tokenizer does not list its vocabulary):
    a prompt of b bytes is at least b / (this x `BYTES_MARGIN`) tokens."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 (a stand-in or unusual tokenizer: no bound)
        return 0
    return max((len(str(t).encode("utf-8", "surrogatepass")) for t in vocab), default=0)


def beyond_context(req: BatchRequest, tokenizer, context_len: int, source: str = "requests.jsonl") -> LineError | None:
    """A `LineError` when `req`'s text is so long that no tokenization fits it in the context
    (more characters than `context_len` tokens of the longest token can hold), found without
    tokenizing it: a 50 MB prompt took 9 GB and a minute to tokenize before the context check
    refused it."""
    longest = max_token_bytes(tokenizer)
    if not longest or req.prompt is not None and not isinstance(req.prompt, str):
        return None
    bound = context_len * longest * BYTES_MARGIN
    if req.kind != "chat":
        texts = [req.prompt]
    else:  # a template may drop earlier assistant turns' reasoning (Qwen3): those are not counted
        msgs = list(req.messages or ())
        texts = [m.get("content") or "" for k, m in enumerate(msgs)
                 if m.get("role") != "assistant" or k == len(msgs) - 1]
    if sum(map(len, texts)) <= bound:
        return None
    chars = sum(len("".join(t.split())) for t in texts)  # a template may trim whitespace (Llama-3: `| trim`)
    if chars <= bound:
        return None
    what = "the prompt holds" if req.kind != "chat" else "the messages hold"
    return LineError(req.line, req.custom_id, f"{source} line {req.line}: {what} {chars:,} characters besides "
                                              f"white space, more than "
                                              f"the model's context of {context_len} tokens can take (its longest "
                                              f"token is {longest} bytes); shorten it",
                     code="context_length_exceeded")


def tokenizer_failure(req: BatchRequest, source: str, exc: Exception) -> LineError:
    return LineError(req.line, req.custom_id, f"{source} line {req.line}: the model's tokenizer cannot encode this "
                                              f"request ({type(exc).__name__}: {exc}); check its text")


def render(req: BatchRequest, tokenizer, source: str = "requests.jsonl",
           limit: int | None = None) -> tuple[str | None, str] | LineError:
    """The text to encode (None for a token-id prompt, checked against the ids the model has:
    `limit`, see `id_limit`; default the tokenizer's size) and how
    error messages name the prompt. Chat text holds its special tokens: encode it with
    `add_special_tokens=False`; completion text with the tokenizer's default."""
    where = f"{source} line {req.line}"
    if req.kind == "chat":
        if not getattr(tokenizer, "chat_template", None):
            return LineError(req.line, req.custom_id, f"{where}: the model has no chat template; send this request "
                                                      "to /v1/completions with a plain prompt, or use a chat model")
        try:
            text = tokenizer.apply_chat_template(template_messages(req, tokenizer), tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 (template errors are Jinja's: raise_exception, TemplateError)
            return LineError(req.line, req.custom_id, f"{where}: the model's chat template rejects these messages "
                                                      f"({exc}); check the roles and their order")
        return text, "the prompt (after the chat template)"
    if isinstance(req.prompt, str):
        return req.prompt, "the prompt"
    vocab = len(tokenizer) if limit is None else limit
    bad = next((t for t in req.prompt if t >= vocab), None)
    if bad is not None:
        return LineError(req.line, req.custom_id, f'{where}: "prompt" has token id {bad}, outside the model\'s '
                                                  f"vocabulary of {vocab}")
    return None, "the prompt"


def template_messages(req: BatchRequest, tokenizer) -> list[dict]:
    """`req`'s messages as SGLang 0.5.23's server gives them to the model's chat template: for a
    template that iterates content (`iterates_content`), a content list stays a list of
    {"type": "text", "text"} parts; for any other, its parts joined by a space (`req.messages`)."""
    if req.parts is None or not iterates_content(getattr(tokenizer, "chat_template", None)):
        return list(req.messages)
    return [m if p is None else {**m, "content": [{"type": "text", "text": t} for t in p]}
            for m, p in zip(req.messages, req.parts)]


MEDIA_WORDS = ("image", "audio", "video", "vision")  # a template naming one takes content lists (SGLang's rule)
CONTENT_OWNERS = ("message", "msg", "m")  # the loop variables SGLang looks for: `for x in message.content`


@functools.lru_cache(maxsize=8)
def iterates_content(template: str | None) -> bool:
    """Whether SGLang 0.5.23's server gives this chat template content lists as lists (its "openai"
    content format) rather than as text: a template naming images, audio, video or vision, or one
    looping over the content of `message`, `msg` or `m` (through filters, tests or a slice). A
    template that does not parse takes text, as there."""
    if not isinstance(template, str):
        return False
    if any(w in template for w in MEDIA_WORDS):
        return True
    try:
        from jinja2 import nodes
        try:  # the environment transformers renders with (its extra tags parse)
            from transformers.utils.chat_template_utils import _compile_jinja_template

            tree = _compile_jinja_template(template).environment.parse(template)
        except ImportError:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            tree = ImmutableSandboxedEnvironment(extensions=[loopcontrols]).parse(template)
    except Exception:  # noqa: BLE001 (jinja2 missing, or a template it cannot parse)
        return False

    def content_of(node) -> bool:
        while isinstance(node, (nodes.Filter, nodes.Test)) or (
                isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)):
            node = node.node
        if isinstance(node, nodes.Getitem):
            key = node.arg.value if isinstance(node.arg, nodes.Const) else None
        elif isinstance(node, nodes.Getattr):
            key = node.attr
        else:
            return False
        return key == "content" and isinstance(node.node, nodes.Name) and node.node.name in CONTENT_OWNERS

    return any(content_of(loop.iter) for loop in tree.find_all(nodes.For))


INPUT_MARGIN = 5  # SGLang 0.5.23's scheduler takes prompts under min(context - 1, pool - 1) - 5 tokens


OUTPUT_MARGIN = 2  # SGLang 0.5.23 generates at most min(context - 1, pool - 1) - 1 - prompt tokens


def output_room(context_len: int, n: int) -> int:
    """The most tokens SGLang's scheduler lets a request of an `n`-token prompt generate in a
    `context_len`-token context (it cuts max_new_tokens to its max_req_len - n - 1, silently)."""
    return context_len - OUTPUT_MARGIN - n


def input_limit(context_len: int) -> int:
    """The longest prompt SGLang's scheduler accepts in a `context_len`-token context (its
    `max_req_input_len` - 1: a prompt of `max_req_input_len` tokens is refused too)."""
    return context_len - 1 - INPUT_MARGIN - 1


def check_context(req: BatchRequest, n: int, what: str, context_len: int, default_max_tokens: int,
                  source: str = "requests.jsonl") -> int | LineError:
    """max_tokens of a prompt of `n` tokens under SGLang's context rule (see module doc)."""
    where = f"{source} line {req.line}"
    if n > input_limit(context_len):
        longer = "longer than the model's context" if n >= context_len else "too long for the model's context"
        return LineError(req.line, req.custom_id, f"{where}: {what} is {n} tokens, {longer} of {context_len} tokens "
                                                  f"(SGLang takes prompts of at most {input_limit(context_len)}); "
                                                  "shorten it",
                         code="context_length_exceeded")
    room = output_room(context_len, n)
    if req.max_tokens is None:
        return min(default_max_tokens, room)
    if req.max_tokens > room:
        return LineError(req.line, req.custom_id, f'{where}: "max_tokens" is {req.max_tokens}, but {what} takes {n} of '
                                                  f"the model's {context_len}-token context: at most {room} fits "
                                                  f"(SGLang keeps {OUTPUT_MARGIN} tokens of it)",
                         code="context_length_exceeded")
    return req.max_tokens


CONTEXT_KEYS = ("max_sequence_length", "seq_length", "max_seq_len", "model_max_length", "max_position_embeddings")


def context_length(model_dir: str | Path) -> int:
    """The model's context as SGLang 0.5.23 derives it (`get_context_length`): the first of
    `CONTEXT_KEYS` in config.json (its text part for multimodal configs), times the rope-scaling
    factor unless the scaling is llama3-style or names its original length; 2048 if none.
    `blendserve run` passes this value to the engine, so the checks here and the engine agree.
    ValueError naming config.json when it is not a JSON object or these values are not numbers."""
    path = Path(model_dir) / "config.json"
    fix = "fix the model's config.json or pass --context-length"
    if not path.is_file():
        raise ValueError(f"--model {model_dir}: not a Hugging Face model directory (no config.json in it); pass the "
                         "folder that holds the model's config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read it as JSON ({exc}); {fix}") from None
    text = cfg.get("text_config") or cfg if isinstance(cfg, dict) else None
    if not isinstance(text, dict):
        raise ValueError(f"{path}: not a JSON object of model settings; {fix}")
    rope = text.get("rope_scaling") or {}
    factor = rope.get("factor", 1) if isinstance(rope, dict) else 1
    if not isinstance(rope, dict) or "original_max_position_embeddings" in rope or rope.get("rope_type") == "llama3":
        factor = 1
    if not (_is_count(factor) or isinstance(factor, float) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"{path}: rope_scaling.factor must be a positive number, got {factor!r}; {fix}")
    for key in CONTEXT_KEYS:
        if text.get(key) is not None:
            if not _is_count(text[key]):
                raise ValueError(f"{path}: {key} must be a positive integer, got {text[key]!r}; {fix}")
            return int(factor * text[key])
    return 2048


def _is_count(v) -> bool:
    """A positive whole number (an integral float too: some configs write 4096.0)."""
    return (isinstance(v, int) and not isinstance(v, bool) and v > 0) or (
        isinstance(v, float) and math.isfinite(v) and v.is_integer() and v > 0)
