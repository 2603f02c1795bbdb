"""A tiny random Qwen2-VL checkpoint for tests and the local default engine, generated on the spot.

Everything is built with the real transformers classes (`Qwen2VLConfig`, `Qwen2Tokenizer`, `Qwen2VLProcessor` with
its image and video processors) so that vLLM and transformers read it exactly as they read Qwen2-VL-7B-Instruct;
only the sizes are small and the vocabulary is a byte-level BPE trained here on a few sentences. Nothing is
downloaded.

NOTE: the checkpoint holds no weights. Serve it with vLLM's `load_format="dummy"` (random weights); transformers'
`from_pretrained` cannot load a model from it, only its config, tokenizer and processor.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (  # type: ignore[attr-defined]
    GenerationConfig,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# Qwen2-VL's special tokens, in the order of their ids in the real vocabulary (151643 ... 151656).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL-7B-Instruct's chat template: one <|vision_start|><|image_pad|><|vision_end|> per image part.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Shipped Qwen2-VL preprocessor defaults (DESIGN.md, "Vision tokens, exactly").
MIN_PIXELS = 3_136
MAX_PIXELS = 12_845_056

# Text the BPE vocabulary is trained on: prompts and JSON answers like the ones the workers exchange.
_CORPUS = (
    "You are a helpful assistant.",
    "Describe the image and answer with JSON that follows the schema.",
    'Read the invoice: {"total": 1234.5, "currency": "EUR", "date": "2024-05-01"}',
    '{"label": "cat", "count": 2, "boxes": [[10, 20, 300, 400]], "confidence": 0.87}',
    '{"refusal": {"code": "unsupported", "message": "I cannot answer this from the image."}}',
    "The quick brown fox jumps over the lazy dog 0123456789 times, true or false, yes or no.",
)


def _train_tokenizer() -> Qwen2Tokenizer:
    """Train a small byte-level BPE with Qwen2's normalizer and pre-tokenizer; special tokens get the last ids."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_CORPUS * 20, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    vocab.update({token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS)})
    merges = [(left, right) for left, right in model["merges"]]
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # the annotation says list[str]; tokenizers' BPE wants pairs
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS),
        model_max_length=32_768,
    )


def write_tiny_qwen2_vl(dest: Path) -> Path:
    """Write a tiny random Qwen2-VL checkpoint (config, tokenizer, processor, generation config) into `dest`.

    Text model: hidden 128, 2 attention heads and 1 KV head of dim 64 (vLLM's CPU attention rejects head dim 16),
    2 layers. Vision tower: depth 2, embed 64, patch 14, merge 2. No weights: load it with `load_format="dummy"`.
    Needs torchvision (transformers' Qwen2-VL image and video processors do). Returns `dest`.
    """
    tokenizer = _train_tokenizer()
    token_id = tokenizer.get_vocab()
    eos_ids = [token_id["<|im_end|>"], token_id["<|endoftext|>"]]

    config = Qwen2VLConfig(
        architectures=["Qwen2VLForConditionalGeneration"],
        dtype="bfloat16",
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 32_768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [8, 12, 12]},
            "bos_token_id": token_id["<|endoftext|>"],
            "eos_token_id": eos_ids,
            "pad_token_id": token_id["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "num_heads": 2,
            "mlp_ratio": 4,
            "hidden_size": 128,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=token_id["<|image_pad|>"],
        video_token_id=token_id["<|video_pad|>"],
        vision_start_token_id=token_id["<|vision_start|>"],
        vision_end_token_id=token_id["<|vision_end|>"],
    )
    generation_config = GenerationConfig(
        bos_token_id=token_id["<|endoftext|>"], eos_token_id=eos_ids, pad_token_id=token_id["<|endoftext|>"]
    )
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )

    dest.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dest)
    generation_config.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest
