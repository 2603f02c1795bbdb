"""LLaMA-Factory's file formats: sharegpt examples with images, `dataset_info.json`, and the two training YAMLs.

Field names follow LLaMA-Factory 0.9.5 (`data/parser.py` DatasetAttr, `data/converter.py`
SharegptDatasetConverter, `hparams/finetuning_args.py`, `hparams/model_args.py`). Image paths are relative to
the export directory, which is the `dataset_dir` (and so the `media_dir`) of both YAMLs: train from inside it,
`cd EXPORT && llamafactory-cli train phase2.yaml`.
"""

from __future__ import annotations

from typing import Any

from streams.dataset.recipe import PhaseName, Recipe

IMAGE_TOKEN = "<image>"
SPLITS = ("train", "eval")


def dataset_name(phase: PhaseName, split: str) -> str:
    return f"vlmflow_{phase}_{split}"


def data_file(phase: PhaseName, split: str) -> str:
    return f"data/{phase}_{split}.jsonl"


def sharegpt_example(prompt: str, image_paths: list[str], answer_text: str) -> dict[str, Any]:
    """One conversation: the user turn starts with one `<image>` per image, the assistant turn is the answer."""
    # NOTE: LLaMA-Factory counts `<image>` in the text against the images; a prompt must not add any of its own.
    text = prompt.replace(IMAGE_TOKEN, "[image]")
    return {
        "messages": [
            {"role": "user", "content": IMAGE_TOKEN * len(image_paths) + text},
            {"role": "assistant", "content": answer_text},
        ],
        "images": image_paths,
    }


def dataset_info(entries: list[tuple[PhaseName, str]]) -> dict[str, Any]:
    """`dataset_info.json` for the (phase, split) files written."""
    return {
        dataset_name(phase, split): {
            "file_name": data_file(phase, split),
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
        for phase, split in entries
    }


def _common(recipe: Recipe, phase: PhaseName, has_eval: bool, max_pixels: int) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "image_max_pixels": max_pixels,
        "trust_remote_code": True,
        "stage": "sft",
        "do_train": True,
        "dataset_dir": ".",
        "dataset": dataset_name(phase, "train"),
        "template": recipe.target.template,
        "cutoff_len": 4096,
        "overwrite_cache": True,
        "preprocessing_num_workers": 4,
        "output_dir": f"saves/{phase}",
        "logging_steps": 10,
        "save_steps": 500,
        "plot_loss": True,
        "overwrite_output_dir": True,
        "report_to": "none",
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 8,
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.03,
        "bf16": True,
        "seed": recipe.seed,
    }
    if has_eval:
        arguments |= {
            "eval_dataset": dataset_name(phase, "eval"),
            "per_device_eval_batch_size": 1,
            "eval_strategy": "steps",
            "eval_steps": 500,
        }
    return arguments


def training_arguments(recipe: Recipe, phase: PhaseName, *, has_eval: bool, max_pixels: int) -> dict[str, Any]:
    """LLaMA-Factory arguments of one phase, with the recipe's `training` overrides applied last.

    Phase 1 trains only the projector (full fine-tuning with vision tower and LLM frozen) to align the vision
    features with the LLM; phase 2 trains LoRA adapters on the LLM with the projector still trainable and the
    vision tower frozen, starting from phase 1's output when the export has a phase 1.
    """
    if phase == "phase1":
        method: dict[str, Any] = {
            "model_name_or_path": recipe.target.model_name_or_path,
            "finetuning_type": "full",
            "freeze_vision_tower": True,
            "freeze_multi_modal_projector": False,
            "freeze_language_model": True,
            "learning_rate": 1.0e-3,
        }
    else:
        start = "saves/phase1" if "phase1" in recipe.phases else recipe.target.model_name_or_path
        method = {
            "model_name_or_path": start,
            "finetuning_type": "lora",
            "lora_rank": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.05,
            "lora_target": "all",
            "freeze_vision_tower": True,
            "freeze_multi_modal_projector": False,
            "learning_rate": 1.0e-4,
        }
    return {**method, **_common(recipe, phase, has_eval, max_pixels), **recipe.training.get(phase, {})}
