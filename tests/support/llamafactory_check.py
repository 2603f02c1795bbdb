"""Load a `vlmflow dataset export` with LLaMA-Factory's own code, in the LLaMA-Factory environment
(scripts/llamafactory-env.sh), and print what it loaded as one JSON line.

    .venv-llamafactory/bin/python tests/support/llamafactory_check.py EXPORT_DIR WORK_DIR

For each phase YAML of the export: `get_train_args` parses it (unknown or misspelt arguments are errors there),
with only the model (a tiny random Qwen2-VL, `workers.tiny_model`), the output directory and what a CPU cannot
do (bf16) replaced; then `get_dataset` converts, checks and tokenizes every conversation and its images, as a
training run would before its first step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer

from workers.tiny_model import write_tiny_qwen2_vl


def main(export_dir: Path, work_dir: Path) -> None:
    model_dir = write_tiny_qwen2_vl(work_dir / "tiny-qwen2-vl")
    os.chdir(export_dir)  # NOTE: the YAMLs say `dataset_dir: .`; training runs from inside the export.
    loaded = {}
    for phase_yaml in sorted(export_dir.glob("phase*.yaml")):
        phase = phase_yaml.stem
        arguments = yaml.safe_load(phase_yaml.read_text())
        arguments |= {
            "model_name_or_path": str(model_dir),
            "output_dir": str(work_dir / "saves" / phase),
            "bf16": False,
            "preprocessing_num_workers": 1,
        }
        model_args, data_args, training_args, finetuning_args, _ = get_train_args(arguments)
        tokenizer_module = load_tokenizer(model_args)
        tokenizer = tokenizer_module["tokenizer"]
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
        image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        train = module["train_dataset"]
        evaluation = module.get("eval_dataset")
        loaded[phase] = {
            "finetuning_type": finetuning_args.finetuning_type,
            "freeze": [
                finetuning_args.freeze_vision_tower,
                finetuning_args.freeze_multi_modal_projector,
                finetuning_args.freeze_language_model,
            ],
            "lora_rank": finetuning_args.lora_rank,
            "train": len(train),
            "eval": len(evaluation) if evaluation is not None else 0,
            "train_with_image_tokens": sum(image_pad in ids for ids in train["input_ids"]),
            "train_with_labels": sum(any(label != -100 for label in labels) for labels in train["labels"]),
        }
    print(json.dumps(loaded, sort_keys=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
