"""The tiny Qwen2-VL checkpoint reads back through transformers' Auto classes like the real one."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.engine
transformers = pytest.importorskip("transformers", reason="needs the engine env (scripts/engine-env.sh)")
Image = pytest.importorskip("PIL.Image")

from workers.tiny_model import SPECIAL_TOKENS  # noqa: E402

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def test_config_is_a_small_qwen2_vl_with_eos_ids(tiny_model_dir: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    generation = transformers.GenerationConfig.from_pretrained(tiny_model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    text = config.text_config

    assert type(config).__name__ == "Qwen2VLConfig"
    assert config.architectures == ["Qwen2VLForConditionalGeneration"]
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (128, 2, 1)
    assert text.hidden_size // text.num_attention_heads == 64
    assert (config.vision_config.depth, config.vision_config.embed_dim) == (2, 64)
    assert text.vocab_size == len(tokenizer)
    eos_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert text.eos_token_id == eos_ids
    assert generation.eos_token_id == eos_ids
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_tokenizer_keeps_every_qwen2_vl_special_token_whole(tiny_model_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)

    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.decode(tokenizer('{"label": "cat"}').input_ids) == '{"label": "cat"}'


def test_chat_template_places_the_image_placeholder(tiny_model_dir: Path) -> None:
    processor = transformers.AutoProcessor.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]

    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_PLACEHOLDER}Describe it.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_processor_turns_1024x768_into_999_vision_tokens(tiny_model_dir: Path) -> None:
    processor = transformers.AutoProcessor.from_pretrained(tiny_model_dir)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"

    batch = processor(images=[Image.new("RGB", (1024, 768))], text=[IMAGE_PLACEHOLDER + "Hi"], return_tensors="pt")

    (grid_thw,) = batch["image_grid_thw"].tolist()
    assert grid_thw == [1, 54, 74]
    assert grid_thw[0] * grid_thw[1] * grid_thw[2] // 4 == 999
    image_pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert batch["input_ids"][0].tolist().count(image_pad_id) == 999
