"""A real tokenizer (Qwen2, 152k vocabulary) and real chat data (ShareGPT): spans by construction,
checked token by token, and exact scores on a large vocabulary."""

import json

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

import tiny
from instructdiff_ray.config import DataConfig, TemplateConfig
from instructdiff_ray.corpus import normalize, plan_shards, read_shard
from instructdiff_ray.engines.base import EngineSettings
from instructdiff_ray.engines.hf import HFEngine
from instructdiff_ray.models import load_tokenizer
from instructdiff_ray.template import alpaca_prompt, tokenize_samples
from reference import reference_scores


@pytest.fixture(scope="module")
def qwen2_tok():
    return load_tokenizer(str(tiny.QWEN2_TOKENIZER))


def qwen2_rows(model_dir, n_alpaca: int, n_chat: int) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids and response masks of GSM8K rows (Alpaca) and ShareGPT conversations (chat)."""
    tok = load_tokenizer(str(model_dir))
    toks = tokenize_samples(_gsm(n_alpaca), TemplateConfig(), tok)
    chat = [t for t in tokenize_samples(_sharegpt(40), TemplateConfig(kind="chat", max_length=384), tok) if t.status == "ok"]
    toks += chat[:n_chat]
    return [t.input_ids for t in toks], [t.response_mask for t in toks]


def _gsm(n):
    cfg = DataConfig(paths=[str(tiny.GSM8K)], limit=n, shard_rows=n)
    return read_shard(plan_shards(cfg)[0], cfg)


def _authors_mask(tok, sample):
    """The authors' released code: tokenize the prompt and the full text separately and score the
    tokens past the prompt's length."""
    prompt = alpaca_prompt(sample.instruction, sample.input)
    full = tok(prompt + "\n" + sample.response)["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    return full, [j >= n_prompt for j in range(len(full))]


def test_alpaca_spans_equal_the_authors_separate_tokenization(qwen2_tok):
    samples = _gsm(300)
    toks = tokenize_samples(samples, TemplateConfig(max_length=4096), qwen2_tok)
    merged = 0
    for s, t in zip(samples, toks):
        ids, mask = _authors_mask(qwen2_tok, s)
        assert t.input_ids == ids and t.response_mask == mask and t.n_response_tokens == sum(mask)
        first = mask.index(True)
        merged += qwen2_tok.convert_ids_to_tokens(ids[first - 1]).endswith("Ċ")  # ":\n" is one (unscored) token
    assert merged == 300  # with this tokenizer the separator is never a scored token of its own


def test_alpaca_scores_on_a_152k_vocabulary_equal_float64(qwen2_model):
    tok = load_tokenizer(str(qwen2_model))
    samples = _gsm(6)
    pairs = [_authors_mask(tok, s) for s in samples]
    ids, masks = [p[0] for p in pairs], [p[1] for p in pairs]
    ref = reference_scores(AutoModelForCausalLM.from_pretrained(qwen2_model), ids, masks)
    toks = tokenize_samples(samples, TemplateConfig(), tok)
    r = HFEngine(str(qwen2_model), None, EngineSettings(max_batch_size=6, max_batch_tokens=100_000)).score(
        [t.input_ids for t in toks], [t.response_mask for t in toks], "base")
    np.testing.assert_allclose(np.c_[r.nll, r.entropy], ref, atol=1e-4, rtol=0)
    assert ref[:, 1].min() > 0.1 and np.abs(ref[:, 0] - ref[:, 1]).max() > 0.1  # real, non-degenerate numbers


def _sharegpt(n, system_too=False):
    """The first n usable conversations (and, with system_too, every one with a system turn)."""
    cfg = DataConfig(paths=["unused"], preset="sharegpt")
    out = []
    with open(tiny.SHAREGPT) as f:
        for i, line in enumerate(f):
            s = normalize("sharegpt", i, json.loads(line), cfg)
            if s.status == "ok" and (len(out) < n or (system_too and any(m["role"] == "system" for m in s.messages))):
                out.append(s)
    return out


def _assert_spans_are_the_assistant_turns(tok, sample, t) -> int:
    """Each scored run of tokens decodes to one assistant turn's content, in order. Where the
    template's text and the content merge into one token at a boundary (a role marker that is not
    a special token, '>' + '"' -> '>"'), that token starts outside the span: at the start it is not
    scored (the content's first characters sit in the token before the run), at the end it is.
    Returns how many turns had such a boundary token."""
    runs, cur, before = [], [], []
    prev = None
    for i, m in zip(t.input_ids, t.response_mask):
        if m:
            if not cur:
                before.append(prev)
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
        prev = i
    if cur:
        runs.append(cur)
    wanted = [m["content"] for m in sample.messages if m["role"] == "assistant" and m["content"]]
    assert len(runs) == len(wanted)
    merged = 0
    for run, prev_id, content in zip(runs, before, wanted):
        dec, head = tok.decode(run), tok.decode([prev_id])
        k = next(k for k in range(0, 4) if dec.startswith(content[k:]) and head.endswith(content[:k]))
        extra = dec[len(content) - k:]
        assert len(extra) <= 2, (content[-20:], dec[-20:])  # only template characters merged at the end
        merged += bool(k or extra)
    return merged
def test_chat_spans_on_real_sharegpt_conversations(qwen2_tok):
    samples = _sharegpt(150, system_too=True)
    toks = tokenize_samples(samples, TemplateConfig(kind="chat", max_length=100_000), qwen2_tok)
    kinds = {"system": 0, "multi": 0, "single": 0}
    turns_total = boundary = 0
    for s, t in zip(samples, toks):
        assert t.status == "ok", t.reason
        boundary += _assert_spans_are_the_assistant_turns(qwen2_tok, s, t)
        turns_total += sum(m["role"] == "assistant" and bool(m["content"]) for m in s.messages)
        kinds["system"] += any(m["role"] == "system" for m in s.messages)
        turns = sum(m["role"] == "assistant" for m in s.messages)
        kinds["multi" if turns > 1 else "single"] += 1
    assert all(kinds.values()), kinds  # system prompts, single- and multi-turn all covered
    assert boundary < 0.1 * turns_total  # boundary merges are the exception


def test_chat_spans_with_and_without_system_prompts(qwen2_tok):
    from instructdiff_ray.corpus import Sample

    convs = [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "Times 2?"}, {"role": "assistant", "content": "8"}],
        [{"role": "assistant", "content": "Hello! Ask me anything."}, {"role": "user", "content": "Why?"},
         {"role": "assistant", "content": "Because."}, {"role": "user", "content": "ok"}],
    ]
    samples = [Sample("f", i, sample_id=str(i), messages=c) for i, c in enumerate(convs)]
    for s, t in zip(samples, tokenize_samples(samples, TemplateConfig(kind="chat"), qwen2_tok)):
        assert t.status == "ok"
        assert _assert_spans_are_the_assistant_turns(qwen2_tok, s, t) == 0


PREAMBLE_TEMPLATE = (
    "<|im_start|>system\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
)


def test_a_preamble_containing_the_answer_does_not_capture_the_span(qwen2_tok):
    """Searching the rendered text for "2024" would find the injected date; the span must be the answer."""
    from instructdiff_ray.corpus import Sample

    tok = load_tokenizer(str(tiny.QWEN2_TOKENIZER))
    tok.chat_template = PREAMBLE_TEMPLATE
    msgs = [{"role": "user", "content": "Which year is it?"}, {"role": "assistant", "content": " 2024 "},
            {"role": "user", "content": "Which day?"}, {"role": "assistant", "content": "26"}]
    (t,) = tokenize_samples([Sample("f", 0, sample_id="x", messages=msgs)], TemplateConfig(kind="chat"), tok)
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text.index("2024") < text.index("Which year")  # the date really comes first
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == t.input_ids
    scored = [(a, b) for (a, b), m in zip(enc["offset_mapping"], t.response_mask) if m]
    assert "".join(text[a:b] for a, b in scored) == "202426"  # the trimmed answers ...
    assert all(a > text.index("Which year") for a, _ in scored)  # ... where they stand, not in the preamble


def test_a_template_that_rewrites_content_is_a_template_error(qwen2_tok):
    from instructdiff_ray.corpus import Sample

    tok = load_tokenizer(str(tiny.QWEN2_TOKENIZER))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (t,) = tokenize_samples([Sample("f", 0, sample_id="x", messages=msgs)], TemplateConfig(kind="chat"), tok)
    assert t.status == "template_error" and "cannot be located exactly" in t.reason


def test_chat_scores_on_a_152k_vocabulary_equal_float64(qwen2_model):
    tok = load_tokenizer(str(qwen2_model))
    samples = _sharegpt(40)
    toks = [t for t in tokenize_samples(samples, TemplateConfig(kind="chat", max_length=384), tok) if t.status == "ok"][:4]
    assert len(toks) == 4
    ids, masks = [t.input_ids for t in toks], [t.response_mask for t in toks]
    r = HFEngine(str(qwen2_model), None, EngineSettings(max_batch_size=4, max_batch_tokens=100_000)).score(ids, masks, "base")
    ref = reference_scores(AutoModelForCausalLM.from_pretrained(qwen2_model), ids, masks)
    np.testing.assert_allclose(np.c_[r.nll, r.entropy], ref, atol=1e-4, rtol=0)
