"""A built-in domain metric for `compare`: exact match of the final numeric answer, GSM8K style
(the number after the first `####`, else the last number in the text), with greedy decoding from
the same template the model was trained with. No code to write: `compare.exact_match: N` scores
the first N held-out rows."""

from __future__ import annotations

import re
from typing import Any

from .config import RunConfig
from .corpus import Sample

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
MARKER = "####"
ANSWERED = re.compile(r"####[^\n]*\d[^\n]*\n")  # a marked answer whose line has ended: nothing after it counts
BATCH = 8


def final_answer(text: str) -> str | None:
    """The answer a GSM8K-style text gives, normalised (`1,234.50` -> `1234.5`, `$42` -> `42`), or None:
    the number after the first `####` (a model that goes on past its answer, repeating the marker
    until the token limit, is judged by the answer it gave first), else the last number."""
    marked = MARKER in text
    numbers = NUMBER.findall(text.split(MARKER, 1)[1] if marked else text)
    if not numbers:
        return None
    raw = (numbers[0] if marked else numbers[-1]).replace(",", "").replace("$", "")
    value = float(raw)
    return str(int(value)) if value.is_integer() else repr(value)


def exact_match(predictions: list[str], references: list[str]) -> list[bool]:
    """Per row: the prediction's final answer equals the reference's (a row without one is wrong)."""
    out = []
    for pred, ref in zip(predictions, references):
        want = final_answer(ref)
        out.append(want is not None and final_answer(pred) == want)
    return out


def answered(tok, start: int):
    """A stopping criterion: a row stops once its continuation (tokens from `start`) holds a marked
    answer whose line has ended, since final_answer reads nothing after it."""
    import torch
    from transformers import StoppingCriteria

    class Answered(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tok.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([bool(ANSWERED.search(t)) for t in texts], device=input_ids.device)

    return Answered()


def generate(model_dir: str, samples: list[Sample], cfg: RunConfig, max_new_tokens: int) -> list[str]:
    """Greedy continuations of each sample's prompt (left-padded batches), each stopped at
    `max_new_tokens` or once its marked answer's line ends."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import load_tokenizer
    from .template import prompt_of

    tok = load_tokenizer(model_dir)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [prompt_of(s, cfg.template, tok) for s in samples]
    out: list[str] = [""] * len(samples)
    todo = [(i, p) for i, p in enumerate(prompts) if not isinstance(p, str)]
    with torch.inference_mode():
        for k in range(0, len(todo), BATCH):
            batch = todo[k : k + BATCH]
            enc = tok([p[0] for _, p in batch], return_tensors="pt", padding=True, add_special_tokens=batch[0][1][1])
            start = enc["input_ids"].shape[1]
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 stopping_criteria=[answered(tok, start)])
            for (i, _), row in zip(batch, gen[:, start:]):
                out[i] = tok.decode(row, skip_special_tokens=True)
    return out


def exact_match_eval(cfg: RunConfig, model_dir: str, heldout: list[Sample]) -> dict[str, Any]:
    """Accuracy of exact match on the first `compare.exact_match` held-out rows."""
    rows = heldout[: cfg.compare.exact_match]
    predictions = generate(model_dir, rows, cfg, cfg.compare.max_new_tokens)
    hits = exact_match(predictions, [s.response for s in rows])
    return {"rows": len(rows), "accuracy": sum(hits) / len(rows) if rows else None, "hits": hits,
            "examples": [{"sample_id": s.sample_id, "prediction": p[-300:]} for s, p in zip(rows[:3], predictions[:3])]}
