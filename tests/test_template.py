from instructdiff_ray.config import TemplateConfig
from instructdiff_ray.corpus import Sample
from instructdiff_ray.models import load_tokenizer
from instructdiff_ray.template import ALPACA_PROMPT, alpaca_prompt, render, tokenize_samples


def _sample(**kw):
    s = Sample("f", 0, sample_id="x")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_alpaca_prompt_is_the_papers_text():
    assert alpaca_prompt("Add 2 and 3.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd 2 and 3.\n\n### Response:"
    )
    with_input = alpaca_prompt("Sum these.", "2, 3")
    assert "### Input:\n2, 3\n\n### Response:" in with_input and "paired with an input" in with_input


def test_alpaca_response_span_starts_at_separator(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    s = _sample(instruction="What is 2+3?", response="It is 5.")
    text, spans, specials = render(s, TemplateConfig(), tok)
    prompt = ALPACA_PROMPT.format(instruction="What is 2+3?")
    assert text == prompt + "\nIt is 5." and spans == [(len(prompt), len(text))] and specials
    (t,) = tokenize_samples([s], TemplateConfig(), tok)
    enc = tok(text, return_offsets_mapping=True)
    first = t.response_mask.index(True)
    assert enc["offset_mapping"][first][0] >= len(prompt)  # first response token at/after the "\n"
    assert enc["offset_mapping"][first - 1][0] < len(prompt)
    assert all(t.response_mask[first:])  # the response runs to the last token, no EOS appended
    assert t.input_ids[0] == tok.bos_token_id and not t.response_mask[0]
    assert t.n_response_tokens == sum(t.response_mask) and t.n_prompt_tokens + t.n_response_tokens == len(t.input_ids)
    decoded = tok.decode([i for i, m in zip(t.input_ids, t.response_mask) if m])
    assert decoded == "\nIt is 5."  # this tokenizer keeps "\n" apart, so the separator is scored (authors: same)


def test_chat_template_scores_every_assistant_turn_only(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello friend"}, {"role": "user", "content": "Add 2 and 2"},
            {"role": "assistant", "content": "Four"}]
    s = _sample(messages=msgs)
    (t,) = tokenize_samples([s], TemplateConfig(kind="chat"), tok)
    scored = tok.decode([i for i, m in zip(t.input_ids, t.response_mask) if m])
    assert scored == "Hello friendFour"
    assert t.n_prompt_tokens + t.n_response_tokens == len(t.input_ids)


def test_raw_template_and_length_policies(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    s = _sample(instruction="Question words " * 20, response="answer words " * 20)
    (raw,) = tokenize_samples([s], TemplateConfig(kind="raw", raw_separator=" => "), tok)
    assert tok.decode([i for i, m in zip(raw.input_ids, raw.response_mask) if m]).startswith(" =>")
    (skipped,) = tokenize_samples([s], TemplateConfig(max_length=30), tok)
    assert skipped.status == "too_long" and "max_length 30" in skipped.reason and skipped.input_ids == []
    (cut,) = tokenize_samples([s], TemplateConfig(max_length=len(raw.input_ids) + 2, length_policy="truncate"), tok)
    assert cut.status == "ok" and len(cut.input_ids) <= len(raw.input_ids) + 2
    (gone,) = tokenize_samples([s], TemplateConfig(max_length=10, length_policy="truncate"), tok)
    assert gone.status == "too_long"  # truncation left no response token


def test_multi_turn_chat_data_under_alpaca_is_a_template_error(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    (t,) = tokenize_samples([_sample(messages=msgs)], TemplateConfig(), tok)
    assert t.status == "template_error" and "chat" in t.reason
