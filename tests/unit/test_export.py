"""Dataset export: seeded mixing by ratios, the stratified split, negatives, box conversion, LLaMA-Factory files.

The whole-export tests use local files only (sources, snapshot and images given as paths), so they need no
service; the S3 and Kafka sources are covered by tests/integration/test_export_llamafactory.py.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from schemas.cases import GoldenRecord
from schemas.logs import ImageInfo
from schemas.settings import load_settings
from schemas.tasks import validate_answer
from streams.dataset.export import ExportedImage, ExportError, confined, convert_boxes, export_dataset
from streams.dataset.llamafactory import dataset_info, sharegpt_example, training_arguments
from streams.dataset.mixing import Example, MixError, draw, mix, natural_size, quotas, seeded, split_by_task
from streams.dataset.negatives import negatives
from streams.dataset.recipe import Recipe, RecipeError, load_recipe
from streams.flywheel.golden import snapshot_lines


def example(example_id: str, task: str = "caption", source: str = "s", images: int = 1) -> Example:
    return Example(
        example_id=example_id,
        source=source,
        task=task,
        prompt=f"Question {example_id}",
        images=[ImageInfo(uri=f"img/{example_id}-{i}.png") for i in range(images)],
        answer={"caption": f"answer {example_id}"},
    )


def test_quotas_follow_the_ratios_and_sum_exactly() -> None:
    assert quotas(10, {"caption": 8, "domain": 2}) == {"caption": 8, "domain": 2}
    assert quotas(7, {"a": 1, "b": 1, "c": 1}) == {"a": 3, "b": 2, "c": 2}
    for total in range(50):
        assert sum(quotas(total, {"a": 3, "b": 5, "c": 0.5}).values()) == total


def test_natural_size_needs_no_repeats() -> None:
    assert natural_size({"caption": 100, "domain": 10}, {"caption": 8, "domain": 2}) == 52  # 42 + 10
    assert natural_size({"caption": 7, "domain": 100}, {"caption": 8, "domain": 2}) == 9  # 7 + 2
    assert natural_size({"a": 0, "b": 5}, {"a": 1, "b": 1}) == 0
    assert natural_size({"golden": 11, "negatives": 33}, {"golden": 8, "negatives": 2}) == 14


def test_split_is_stratified_by_task_and_disjoint() -> None:
    pool = [example(f"d{i}", "detect") for i in range(20)] + [example(f"c{i}", "caption") for i in range(10)]
    pool += [example("g0", "ground")]
    train, evaluation = split_by_task(pool, 0.2, lambda task: seeded(1, "split", task))
    assert Counter(e.task for e in evaluation) == {"detect": 4, "caption": 2}
    assert Counter(e.task for e in train) == {"detect": 16, "caption": 8, "ground": 1}
    assert not {e.example_id for e in train} & {e.example_id for e in evaluation}
    assert split_by_task(list(reversed(pool)), 0.2, lambda task: seeded(1, "split", task)) == (train, evaluation)


def test_draw_repeats_evenly_and_mix_is_seeded() -> None:
    pool = [example(str(i)) for i in range(4)]
    drawn = draw(pool, 10, random.Random(3))
    assert sorted(Counter(e.example_id for e in drawn).values()) == [2, 2, 3, 3]
    pools = {"caption": [example(f"c{i}") for i in range(30)], "domain": [example(f"d{i}") for i in range(5)]}
    first = mix(pools, {"caption": 8, "domain": 2}, 100, lambda name: seeded(7, "train", name))
    assert Counter(e.example_id[0] for e in first) == {"c": 80, "d": 20}
    assert first == mix(pools, {"caption": 8, "domain": 2}, 100, lambda name: seeded(7, "train", name))
    assert first != mix(pools, {"caption": 8, "domain": 2}, 100, lambda name: seeded(8, "train", name))
    with pytest.raises(MixError, match="'domain' has no examples"):
        mix({"caption": pools["caption"], "domain": []}, {"caption": 8, "domain": 2}, 10, lambda n: seeded(1, n))


def test_negatives_are_refusals_valid_for_their_task() -> None:
    base = [
        Example(
            example_id="x",
            source="golden",
            task="detect",
            prompt="Find cats.",
            images=[ImageInfo(uri="a")],
            answer={"objects": [{"label": "cat", "bbox_xyxy": [1, 1, 2, 2]}]},
        ),
        Example(
            example_id="y",
            source="golden",
            task="extract",
            prompt="Read it.",
            images=[ImageInfo(uri="b")] * 2,
            answer={"iban": "x", "vat_number": "y"},
        ),
    ]
    made = negatives(
        base, ["wrong_field", "missing_partition", "unsupported_capability"], source="neg", rng=random.Random(0)
    )
    assert [e.example_id for e in made] == [
        f"{i}~{k}" for i in "xy" for k in ("wrong_field", "missing_partition", "unsupported_capability")
    ]
    codes = Counter(e.answer["refusal"]["code"] for e in made)
    assert codes == {"unknown_field": 2, "missing_partition": 2, "unsupported_capability": 2}
    for negative in made:
        schema = {"type": "object"} if negative.task == "extract" else None
        validate_answer(negative.task, negative.answer, schema)
        assert negative.images == next(b for b in base if negative.example_id.startswith(b.example_id)).images
    by_id = {e.example_id: e for e in made}
    assert '"iban"' not in by_id["y~wrong_field"].prompt and '"vat_number"' not in by_id["y~wrong_field"].prompt
    page = int(by_id["y~missing_partition"].prompt.split()[3].rstrip("."))
    assert page > 2 and f"has 2 pages; page {page}" in by_id["y~missing_partition"].answer["refusal"]["message"]


def test_boxes_convert_to_each_model_convention() -> None:
    image = ExportedImage("images/a.png", 2000, 1000)
    answer = {"objects": [{"label": "cat", "bbox_xyxy": [200.0, 100.0, 1000.0, 1000.0]}]}
    assert convert_boxes(answer, image, "qwen2-vl", 1_003_520) == {
        "objects": [{"label": "cat", "box_1000": [100, 100, 500, 1000]}]
    }
    # Qwen2.5-VL: pixels of the image the processor resizes to (here 1414x700 for max_pixels 1,003,520).
    assert convert_boxes(answer, image, "qwen2.5-vl", 1_003_520)["objects"][0]["bbox_2d"] == [140, 70, 700, 700]


def test_llamafactory_shapes() -> None:
    record = sharegpt_example("What is <image> this?", ["images/a.png", "images/b.png"], '{"caption":"x"}')
    assert record == {
        "messages": [
            {"role": "user", "content": "<image><image>What is [image] this?"},
            {"role": "assistant", "content": '{"caption":"x"}'},
        ],
        "images": ["images/a.png", "images/b.png"],
    }
    info = dataset_info([("phase2", "train")])
    assert info["vlmflow_phase2_train"]["file_name"] == "data/phase2_train.jsonl"
    assert info["vlmflow_phase2_train"]["formatting"] == "sharegpt"
    assert info["vlmflow_phase2_train"]["columns"] == {"messages": "messages", "images": "images"}
    recipe = Recipe.model_validate(
        {
            "name": "r",
            "seed": 1,
            "phases": {
                "phase1": {"sources": [{"name": "c", "kind": "jsonl", "path": "x", "ratio": 1}]},
                "phase2": {"sources": [{"name": "g", "kind": "golden", "ratio": 1}]},
            },
            "training": {"phase2": {"lora_rank": 8}},
        }
    )
    phase1 = training_arguments(recipe, "phase1", has_eval=True, max_pixels=1_003_520)
    assert phase1["finetuning_type"] == "full"
    assert (phase1["freeze_vision_tower"], phase1["freeze_multi_modal_projector"], phase1["freeze_language_model"]) == (
        True,
        False,
        True,
    )
    assert phase1["eval_dataset"] == "vlmflow_phase1_eval"
    phase2 = training_arguments(recipe, "phase2", has_eval=False, max_pixels=1_003_520)
    assert phase2["finetuning_type"] == "lora" and phase2["lora_rank"] == 8 and phase2["template"] == "qwen2_vl"
    assert (phase2["freeze_vision_tower"], phase2["freeze_multi_modal_projector"]) == (True, False)
    assert phase2["model_name_or_path"] == "saves/phase1" and "eval_dataset" not in phase2


def test_recipe_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "r",
                "seed": 1,
                "phases": {"phase2": {"sources": [{"name": "n", "kind": "negatives", "of": "missing", "ratio": 1}]}},
            }
        )
    )
    with pytest.raises(RecipeError, match="'of' must name a golden or jsonl source"):
        load_recipe(path)
    path.write_text("name: r\nseed: 1\nphases: {phase3: {sources: []}}\n")
    with pytest.raises(RecipeError, match="phases.phase3"):
        load_recipe(path)


def _write_inputs(root: Path) -> Path:
    """Local sources: 12 captions, 3 domain descriptions, a golden snapshot of 10 detect and 4 extract records."""
    (root / "img").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (64 + 8 * i, 48), (i * 40, 0, 0)).save(root / "img" / f"{i}.png")
    captions = [
        {
            "id": f"cap{i}",
            "prompt": "Describe the image.",
            "images": [f"img/{i % 6}.png"],
            "answer": f"A red square number {i}.",
        }
        for i in range(12)
    ]
    domain = [
        {"prompt": "What part is this?", "images": [{"uri": f"img/{i}.png"}], "answer": f"Part {i}."} for i in range(3)
    ]
    (root / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in captions))
    (root / "domain.jsonl").write_text("".join(json.dumps(line) + "\n" for line in domain))
    records = [
        GoldenRecord(
            record_id=f"case-{i:02d}",
            version=1,
            task="detect",
            prompt="Find the shapes.",
            images=[ImageInfo(uri=f"img/{i % 6}.png", width=64 + 8 * (i % 6), height=48)],
            answer={"objects": [{"label": "square", "bbox_xyxy": [4.0, 4.0, 20.0, 24.0]}]},
            source_log_id=f"log-{i}",
        )
        for i in range(10)
    ] + [
        GoldenRecord(
            record_id=f"case-x{i}",
            version=2,
            task="extract",
            prompt="Read the total.",
            images=[ImageInfo(uri="img/5.png")],
            answer={"total": i},
            source_log_id=f"log-x{i}",
        )
        for i in range(4)
    ]
    (root / "golden.jsonl").write_bytes(snapshot_lines(records))
    recipe = {
        "name": "unit",
        "seed": 11,
        "eval_fraction": 0.2,
        "phases": {
            "phase1": {
                "size": 40,
                "sources": [
                    {"name": "captions", "kind": "jsonl", "path": "captions.jsonl", "ratio": 8},
                    {"name": "domain", "kind": "jsonl", "path": "domain.jsonl", "ratio": 2},
                ],
            },
            "phase2": {
                "sources": [
                    {"name": "golden", "kind": "golden", "path": "golden.jsonl", "ratio": 8},
                    {"name": "negatives", "kind": "negatives", "of": "golden", "ratio": 2},
                ]
            },
        },
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_a_whole_export_is_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    recipe_path = _write_inputs(tmp_path / "inputs")
    recipe, base = load_recipe(recipe_path)
    settings = load_settings()
    first = export_dataset(recipe, base, str(tmp_path / "one"), settings)
    export_dataset(recipe, base, str(tmp_path / "two"), settings)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")
    reseeded = recipe.model_copy(update={"seed": 12})
    export_dataset(reseeded, base, str(tmp_path / "three"), settings)
    assert _tree(tmp_path / "one") != _tree(tmp_path / "three")

    phases = first.manifest["phases"]
    assert phases["phase1"]["train"] == {
        "examples": 40,
        "by_source": {"captions": 32, "domain": 8},
        "by_task": {"caption": 40},
    }
    # Golden: 10 detect → 2 eval, 4 extract → 1 eval; each part's negatives are made from that part alone. The
    # natural size takes every golden train record once: 14 = 11 golden + 3 negatives (8:2 rounded).
    assert phases["phase2"]["train"]["by_source"] == {"golden": 11, "negatives": 3}
    assert phases["phase2"]["eval"]["by_source"] == {"golden": 3, "negatives": 1}
    lines = [json.loads(line) for line in (tmp_path / "one" / "data" / "phase2_train.jsonl").read_text().splitlines()]
    for line in lines:
        user, assistant = line["messages"]
        assert user["content"].count("<image>") == len(line["images"]) == 1
        assert all((tmp_path / "one" / path).is_file() for path in line["images"])
        answer = json.loads(assistant["content"])
        assert "bbox_xyxy" not in assistant["content"]
        if "objects" in answer:
            assert all(0 <= value <= 1000 for value in answer["objects"][0]["box_1000"])
    assert sum("refusal" in json.loads(line["messages"][1]["content"]) for line in lines) >= 1
    info = json.loads((tmp_path / "one" / "dataset_info.json").read_text())
    assert sorted(info) == [
        "vlmflow_phase1_eval",
        "vlmflow_phase1_train",
        "vlmflow_phase2_eval",
        "vlmflow_phase2_train",
    ]
    phase2 = yaml.safe_load((tmp_path / "one" / "phase2.yaml").read_text())
    assert phase2["dataset"] == "vlmflow_phase2_train" and phase2["dataset_dir"] == "."


def _recipe_with_image(root: Path, image: str) -> Path:
    """A recipe whose one caption example names `image` (a location taken from a log, so hostile)."""
    root.mkdir(parents=True, exist_ok=True)
    line = {"id": "c0", "prompt": "Describe the image.", "images": [image], "answer": "A square."}
    (root / "captions.jsonl").write_text(json.dumps(line) + "\n")
    recipe = {
        "name": "confined",
        "seed": 1,
        "eval_fraction": 0.0,
        "phases": {"phase1": {"sources": [{"name": "c", "kind": "jsonl", "path": "captions.jsonl", "ratio": 1}]}},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


def test_an_export_reads_images_inside_the_recipes_directory(tmp_path: Path) -> None:
    (tmp_path / "inputs" / "img").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "inputs" / "img" / "a.png")
    recipe, base = load_recipe(_recipe_with_image(tmp_path / "inputs", "img/../img/a.png"))
    summary = export_dataset(recipe, base, str(tmp_path / "out"), load_settings())
    assert summary.manifest["images"] == 1


@pytest.mark.parametrize("kind", ["absolute", "dot-dot", "symlink"])
def test_an_export_never_reads_a_file_outside_the_recipes_directory(tmp_path: Path, kind: str) -> None:
    """A log that names `/etc/hostname` (or any file) must not put it into a training set."""
    outside = tmp_path / "private" / "secret.png"
    outside.parent.mkdir()
    Image.new("RGB", (32, 32), "blue").save(outside)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    location = {"absolute": str(outside), "dot-dot": "../private/secret.png", "symlink": "link/secret.png"}[kind]
    (inputs / "link").symlink_to(outside.parent)
    recipe, base = load_recipe(_recipe_with_image(inputs, location))
    with pytest.raises(ExportError, match="absolute path|outside the recipe's directory"):
        export_dataset(recipe, base, str(tmp_path / "out"), load_settings())
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


@pytest.mark.parametrize(
    ("location", "what"),
    [
        ("s3://private-bucket/x.png", "is not one an export reads (vlm-images, vlm-datasets)"),
        ("s3://vlm-images/../private-bucket/x.png", "'..' segment"),
        ("s3://vlm-images/a/./x.png", "'.' or '..' segment"),
        ("/etc/hostname", "absolute path"),
        ("../../etc/hostname", "outside the recipe's directory"),
        ("img/\x00.png", "NUL character"),
    ],
)
def test_locations_outside_the_configured_buckets_and_directory_are_refused(
    tmp_path: Path, location: str, what: str
) -> None:
    with pytest.raises(ExportError, match=re.escape(what)):
        confined(location, tmp_path, ["vlm-images", "vlm-datasets"])


def test_locations_inside_are_where_they_say() -> None:
    base = Path("/srv/recipes")
    assert confined("s3://vlm-datasets/golden/a.jsonl", base, ["vlm-datasets"]) == ("vlm-datasets", "golden/a.jsonl")
    assert confined("data/a.jsonl", base, []) == base.resolve() / "data" / "a.jsonl"
