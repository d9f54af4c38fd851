"""Template stage: render a sample to text, tokenize it once, mark the response tokens.

The response span is defined on the single tokenization of the whole text by character
offsets (README: "Corpora and templates"): a token is a response token when its offset starts inside a
response span. Nothing is re-tokenized later; the scorer sees only ids and the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TemplateConfig
from .corpus import EMPTY_RESPONSE, Sample

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)

TOO_LONG = "too_long"
TEMPLATE_ERROR = "template_error"


@dataclass
class Tokenized:
    input_ids: list[int]
    response_mask: list[bool]  # True where the token is a response token (scored from the previous position)
    n_prompt_tokens: int
    n_response_tokens: int
    status: str = "ok"
    reason: str = ""


def alpaca_prompt(instruction: str, input_text: str) -> str:
    if input_text.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def _as_pair(sample: Sample) -> tuple[str, str, str] | str:
    """(instruction, input, response); chat data only maps when it is one user turn and one answer."""
    if sample.messages is None:
        return sample.instruction, sample.input, sample.response
    turns = [m for m in sample.messages if m["role"] != "system"]
    if len(turns) == 2 and turns[0]["role"] == "user" and turns[1]["role"] == "assistant":
        system = "\n\n".join(m["content"] for m in sample.messages if m["role"] == "system")
        instruction = f"{system}\n\n{turns[0]['content']}" if system else turns[0]["content"]
        return instruction, "", turns[1]["content"]
    return "multi-turn conversation: use template.kind=chat"


def _as_messages(sample: Sample) -> list[dict[str, str]]:
    if sample.messages is not None:
        return sample.messages
    user = sample.instruction + (f"\n\n{sample.input}" if sample.input.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": sample.response}]


def _sentinel(i: int, texts: list[str]) -> str:
    """A marker that no message contains, standing in for assistant turn i while rendering."""
    for salt in range(100):
        mark = f"\u27e6instructdiff-{salt}-{i}\u27e7"
        if not any(mark in t for t in texts):
            return mark
    raise ValueError("cannot build a marker absent from the conversation")


def chat_spans(messages: list[dict[str, str]], tokenizer) -> tuple[str, list[tuple[int, int]]] | str:
    """The rendered conversation and the character span of every assistant turn's content, by
    construction: the template is rendered once with each assistant content replaced by a unique
    marker, which gives the template's own text around every turn; the real rendering must equal
    that text with the contents put back (as given, or trimmed, as many templates do), so each
    span is known exactly. Anything else (a template that rewrites content) is an error string,
    never a guess."""
    contents = [m["content"] for m in messages]
    marks = {i: _sentinel(i, contents) for i, m in enumerate(messages) if m["role"] == "assistant"}
    masked = [{**m, "content": marks[i]} if i in marks else m for i, m in enumerate(messages)]
    skeleton = tokenizer.apply_chat_template(masked, tokenize=False)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    for variant in (lambda c: c, str.strip):
        pieces, spans, cursor, out = [], [], 0, 0
        ok = True
        for i, mark in marks.items():
            at = skeleton.find(mark, cursor)
            if at < 0 or skeleton.find(mark, at + 1) >= 0:
                ok = False
                break
            fixed = skeleton[cursor:at]
            content = variant(messages[i]["content"])
            pieces += [fixed, content]
            out += len(fixed)
            spans.append((out, out + len(content)))
            out += len(content)
            cursor = at + len(mark)
        if ok and "".join(pieces) + skeleton[cursor:] == text:
            return text, spans
    return "the chat template renders an assistant turn differently from its content; its span cannot be located exactly"


def render(sample: Sample, cfg: TemplateConfig, tokenizer) -> tuple[str, list[tuple[int, int]], bool] | str:
    """(text, response char spans, add_special_tokens) or an error string."""
    if cfg.kind == "chat":
        if not getattr(tokenizer, "chat_template", None):
            return "tokenizer has no chat template"
        located = chat_spans(_as_messages(sample), tokenizer)
        if isinstance(located, str):
            return located
        text, spans = located
        return text, spans, False
    pair = _as_pair(sample)
    if isinstance(pair, str):
        return pair
    instruction, input_text, response = pair
    if cfg.kind == "alpaca":
        prompt, sep = alpaca_prompt(instruction, input_text), "\n"
    else:
        prompt = instruction + (f"\n\n{input_text}" if input_text.strip() else "")
        sep = cfg.raw_separator
    text = prompt + sep + response
    return text, [(len(prompt), len(text))], True


def prompt_of(sample: Sample, cfg: TemplateConfig, tokenizer) -> tuple[str, bool] | str:
    """(the text before the first response, add_special_tokens): what a model continues when it is
    asked to answer (compare's exact match), cut where scoring's first response span starts."""
    rendered = render(sample, cfg, tokenizer)
    if isinstance(rendered, str):
        return rendered
    text, spans, special = rendered
    return text[: spans[0][0]], special


def tokenize_samples(samples: list[Sample], cfg: TemplateConfig, tokenizer) -> list[Tokenized]:
    """Tokenize the ok samples of a shard in one batched call; others pass their status through."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast (Rust) tokenizer is required for character offsets")
    out: list[Tokenized | None] = [None] * len(samples)
    todo: dict[bool, list[tuple[int, str, list[tuple[int, int]]]]] = {True: [], False: []}
    for i, s in enumerate(samples):
        if s.status != "ok":
            out[i] = Tokenized([], [], 0, 0, s.status, s.reason)
            continue
        try:
            rendered = render(s, cfg, tokenizer)
        except Exception as err:  # noqa: BLE001 - a chat template may raise anything (jinja raise_exception)
            rendered = f"the template raised {type(err).__name__}: {str(err)[:300]}"
        if isinstance(rendered, str):
            out[i] = Tokenized([], [], 0, 0, TEMPLATE_ERROR, rendered)
            continue
        text, spans, specials = rendered
        todo[specials].append((i, text, spans))
    for specials, items in todo.items():
        if not items:
            continue
        enc = tokenizer(
            [t for _, t, _ in items],
            add_special_tokens=specials,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        for k, (i, _, spans) in enumerate(items):
            out[i] = _mark(enc["input_ids"][k], enc["offset_mapping"][k], enc["special_tokens_mask"][k], spans, cfg)
    return out  # type: ignore[return-value]


def response_alone(samples: list[Sample], toks: list[Tokenized], cfg: TemplateConfig, tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Each ok row's response tokenized on its own, as the IFD papers score it (the tokenizer's
    own special tokens, e.g. BOS, then the response; every token after the first is scored).
    Chat rows: the assistant turns' contents joined by newlines. Rows not ok: empty."""
    out: list[tuple[list[int], list[bool]]] = [([], [])] * len(samples)
    idx = [i for i, t in enumerate(toks) if t.status == "ok"]
    texts = [("\n".join(m["content"] for m in samples[i].messages if m["role"] == "assistant")
              if samples[i].messages is not None else samples[i].response) for i in idx]
    if not texts:
        return out
    enc = tokenizer(texts, add_special_tokens=True)["input_ids"]
    for i, ids in zip(idx, enc):
        ids = ids[: cfg.max_length]
        out[i] = (ids, [False] + [True] * (len(ids) - 1)) if len(ids) > 1 else ([], [])
    return out


def _mark(ids, offsets, special, spans, cfg: TemplateConfig) -> Tokenized:
    mask = []
    for j, ((start, end), sp) in enumerate(zip(offsets, special)):
        inside = not sp and end > start and any(a <= start < b for a, b in spans)
        mask.append(inside and j > 0)  # token 0 has no preceding position to predict it
    n = len(ids)
    if n > cfg.max_length:
        if cfg.length_policy == "skip":
            return Tokenized([], [], 0, 0, TOO_LONG, f"{n} tokens > max_length {cfg.max_length}")
        ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
    t = sum(mask)
    if t == 0:
        status = TOO_LONG if n > cfg.max_length else EMPTY_RESPONSE
        return Tokenized([], [], 0, 0, status, "no response tokens after templating/truncation")
    return Tokenized(list(ids), mask, len(ids) - t, t)
