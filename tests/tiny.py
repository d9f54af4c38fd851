"""Tiny real models for tests, built offline: a BPE tokenizer trained on the spot and a Llama
with head_dim 64 (the shape vLLM also accepts), plus LoRA and full-finetune warmup variants."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K = SHARED_DATA / "gsm8k_train.jsonl"
CODE_ALPACA = SHARED_DATA / "code_alpaca_4k.json"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def training_text(n: int = 400) -> list[str]:
    from instructdiff_ray.template import ALPACA_PROMPT_INPUT

    lines = [ALPACA_PROMPT_INPUT]
    with open(GSM8K) as f:
        for i, line in enumerate(f):
            if i >= n:
                break
            rec = json.loads(line)
            lines += [rec["question"], rec["answer"]]
    return lines


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_text(), trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path, seed: int = 0, layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so entropies are far from log(V)
        model.lm_head.weight.mul_(12)
    model.save_pretrained(out)
    return out


def build_lora_adapter(base: Path, out: Path, seed: int = 1) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(out)
    return out


def build_full_warmup(base: Path, out: Path, seed: int = 2) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def build_tiny_gemma2(out: Path, softcap: float = 3.0, seed: int = 0) -> Path:
    """A tiny Gemma-2 on the same tokenizer: its final logit soft-capping is a logit transform
    that training and scoring must both apply."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=4096, final_logit_softcapping=softcap,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # logits well beyond the cap, so the soft-capping changes the numbers
        model.lm_head.weight.mul_(40)
    model.save_pretrained(out)
    return out


def build_tiny_arch(out: Path, arch: str, seed: int = 0) -> Path:
    """A tiny random model of one of the decoder-only families the vllm engine is tested on, on
    the tiny BPE tokenizer: hidden 128, 2 layers, head_dim 64 (what vLLM's CPU attention takes)."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = {
        "mistral": lambda: transformers.MistralConfig(num_key_value_heads=1, head_dim=64, sliding_window=None, **common),
        "qwen3": lambda: transformers.Qwen3Config(num_key_value_heads=1, head_dim=64, **common),
        # Gemma checkpoints tie the LM head to the embeddings (vLLM's Gemma classes assume so)
        "gemma2": lambda: transformers.Gemma2Config(num_key_value_heads=1, head_dim=64, final_logit_softcapping=3.0,
                                                    **{**common, "tie_word_embeddings": True}),
        "gemma3": lambda: transformers.Gemma3TextConfig(num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                                                        sliding_window=512, **{**common, "tie_word_embeddings": True}),
        "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, original_max_position_embeddings=4096, **common),
    }[arch]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # logits far from uniform, as a trained model's are
        model.get_output_embeddings().weight.mul_(12)
    model.save_pretrained(out)
    return out


QWEN2_TOKENIZER = SHARED_DATA / "qwen2_tokenizer"
SHAREGPT = SHARED_DATA / "sharegpt_2k.jsonl"


def build_tiny_qwen2(out: Path, seed: int = 0) -> Path:
    """A tiny random Qwen2 on the real Qwen2 tokenizer (152k vocabulary, the DeepSeek-R1-Distill
    chat template): the LM head is large, as real models' are; head_dim 64 for vLLM."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=152_128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(out)
    return out


def add_to_hub_cache(hf_home: Path, repo: str, model_dir: Path, commit: str, branch: str = "main",
                     repo_type: str = "model") -> Path:
    """Lay a model (or dataset) directory out in a Hugging Face cache as huggingface_hub writes it
    (content-addressed blobs, a snapshot of links per commit, a ref per branch), so that an
    offline `snapshot_download(repo)` finds it. Returns the snapshot directory."""
    import hashlib
    import os

    root = hf_home / "hub" / f"{repo_type}s--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / branch).write_text(commit)
    return snap
