"""`vlmflow dataset export`: a recipe's sources → mixed, split, converted LLaMA-Factory training data.

Layout of an export (a directory, or the same files under an `s3://bucket/prefix`):

    dataset_info.json               the datasets below, sharegpt with images
    data/<phase>_<train|eval>.jsonl one conversation a line
    images/<sha256>.<ext>           every image the conversations use, named by content
    phase1.yaml, phase2.yaml        LLaMA-Factory training arguments (run from inside the export directory)
    manifest.json                   counts per phase, split, source and task

The same recipe, seed and inputs give the same bytes: every draw is seeded (`streams.dataset.mixing`), files are written
with sorted keys, images are named by content, and nothing records when it was made.

Confinement: sources and images are read only from inside the recipe's directory (local paths, relative, after
resolving links) and from the configured buckets (`s3.image_buckets` and `s3.dataset_bucket`); an image location
names whatever a log said, so anything else (an absolute path, `..` out of the directory, another bucket, a key
with `.` or `..` segments) stops the export with one line naming it, before anything is read.

Per phase: each source's examples are split into train and eval by task *before* resampling (an example never
lands in both); negatives are made from their base source's train and eval parts separately; then each split is
mixed by the recipe ratios. Boxes are converted from the normalized `bbox_xyxy` (pixels of the original image) to
the target model's convention, measured on the image actually exported; a multi-image answer's boxes refer to
its first image.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from minio import Minio
from minio.error import S3Error
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from schemas.boxes import xyxy_to_qwen2vl_1000, xyxy_to_qwen25vl_abs
from schemas.cases import GoldenRecord
from schemas.connections import object_store
from schemas.errors import VlmflowError
from schemas.logs import ImageInfo
from schemas.settings import ModelFamily, Settings
from schemas.tasks import MODEL_BOX_FIELD
from streams.dataset.llamafactory import SPLITS, data_file, dataset_info, sharegpt_example, training_arguments
from streams.dataset.mixing import Example, mix, seeded, split_by_task
from streams.dataset.negatives import negatives
from streams.dataset.recipe import GoldenSource, JsonlSource, NegativesSource, PhaseName, Recipe
from streams.flywheel.golden import parse_snapshot, read_golden
from workers.tokens import resized_size, vision_spec


class ExportError(VlmflowError):
    """An export that cannot be made: a source or image that cannot be read, a bad line, a bad output place."""


@dataclass(frozen=True)
class ExportedImage:
    path: str
    """Relative to the export root: `images/<sha256>.<ext>`."""
    width: int
    height: int


@dataclass(frozen=True)
class ExportSummary:
    out: str
    files: list[str]
    manifest: dict[str, Any]


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ExportError(f"{uri!r} is no s3://bucket/key")
    return bucket, key


def confined(location: str, base_dir: Path, buckets: Sequence[str]) -> Path | tuple[str, str]:
    """Where an export may read `location`: a file inside `base_dir`, or `(bucket, key)` in one of `buckets`;
    `ExportError` for anything else (see the module docstring)."""
    if location.startswith("s3://"):
        bucket, key = split_s3(location)
        if bucket not in buckets:
            raise ExportError(f"{location}: bucket {bucket!r} is not one an export reads ({', '.join(buckets)})")
        if any(segment in ("", ".", "..") for segment in key.split("/")):
            raise ExportError(f"{location}: empty, '.' or '..' segment in the key")
        return bucket, key
    if "\x00" in location:
        raise ExportError(f"{location!r}: a NUL character in a path")
    if PurePosixPath(location).is_absolute() or Path(location).is_absolute():
        raise ExportError(
            f"{location!r}: an absolute path; local files are read relative to the recipe, inside {base_dir}"
        )
    root = base_dir.resolve()
    try:
        path = (root / location).resolve()
    except (OSError, RuntimeError) as exc:  # NOTE: RuntimeError: a loop of symbolic links
        raise ExportError(f"{location!r}: cannot be resolved ({exc})") from None
    if not path.is_relative_to(root):
        raise ExportError(f"{location!r}: outside the recipe's directory {root}")
    return path


def _read_bytes(location: str, base_dir: Path, store: Minio, buckets: Sequence[str]) -> bytes:
    """A local file inside the recipe's directory or an `s3://` object of the configured buckets."""
    where = confined(location, base_dir, buckets)
    try:
        if isinstance(where, tuple):
            response = store.get_object(*where)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        return where.read_bytes()
    except S3Error as exc:
        raise ExportError(f"cannot read {location}: {exc.code}") from None
    except OSError as exc:
        raise ExportError(f"cannot read {location}: {exc.strerror}") from None


def examples_from_jsonl(data: bytes, *, source: str, default_task: str, where: str) -> list[Example]:
    """The examples of a JSONL source: one `{"id"?, "task"?, "prompt", "images", "answer"}` (or a golden record)
    a line; blank lines are skipped."""
    examples = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            images = [
                ImageInfo(uri=image) if isinstance(image, str) else ImageInfo(**image) for image in item["images"]
            ]
            examples.append(
                Example(
                    example_id=str(item.get("id") or item.get("record_id") or f"{source}:{number}"),
                    source=source,
                    task=item.get("task") or default_task,
                    prompt=item["prompt"],
                    images=images,
                    answer=item["answer"],
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            reason = f"missing {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
            raise ExportError(f"{where} line {number}: not an example ({reason})") from None
    return examples


def examples_from_golden(records: list[GoldenRecord], *, source: str) -> list[Example]:
    return [
        Example(
            example_id=record.record_id,
            source=source,
            task=record.task or "unknown",
            prompt=record.prompt,
            images=record.images,
            answer=record.answer,
        )
        for record in records
    ]


def convert_boxes(answer: Any, image: ExportedImage, family: ModelFamily, max_pixels: int) -> Any:
    """Every `bbox_xyxy` (pixels of the original image) in `answer` → the target model's key and coordinates."""
    if isinstance(answer, list):
        return [convert_boxes(item, image, family, max_pixels) for item in answer]
    if not isinstance(answer, dict):
        return answer
    converted = {key: convert_boxes(value, image, family, max_pixels) for key, value in answer.items()}
    if "bbox_xyxy" in converted:
        x1, y1, x2, y2 = converted.pop("bbox_xyxy")
        box = (float(x1), float(y1), float(x2), float(y2))
        key = MODEL_BOX_FIELD[family]
        if family == "qwen2.5-vl":
            resized_width, resized_height = resized_size(
                image.width, image.height, family=family, max_pixels=max_pixels
            )
            converted[key] = list(
                xyxy_to_qwen25vl_abs(
                    box,
                    width=image.width,
                    height=image.height,
                    resized_width=resized_width,
                    resized_height=resized_height,
                )
            )
        else:
            converted[key] = list(xyxy_to_qwen2vl_1000(box, width=image.width, height=image.height))
    return converted


def answer_text(answer: dict[str, Any] | str) -> str:
    """Text answers as they are; JSON answers compact with sorted keys, as the constrained decoder writes them."""
    if isinstance(answer, str):
        return answer
    return json.dumps(answer, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _dumps_line(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


class _Exporter:
    def __init__(self, recipe: Recipe, base_dir: Path, settings: Settings):
        self.recipe = recipe
        self.base_dir = base_dir
        self.settings = settings
        self.store = object_store(settings)
        family_default = vision_spec(recipe.target.family).max_pixels
        self.max_pixels = recipe.target.max_pixels or settings.model.max_pixels or family_default
        self.buckets = [*settings.s3.image_buckets, settings.s3.dataset_bucket]
        self._golden_topic: list[GoldenRecord] | None = None

    def load(self, source: JsonlSource | GoldenSource) -> list[Example]:
        if isinstance(source, JsonlSource):
            data = _read_bytes(source.path, self.base_dir, self.store, self.buckets)
            return examples_from_jsonl(data, source=source.name, default_task=source.task, where=source.path)
        if source.path is not None:
            records = parse_snapshot(_read_bytes(source.path, self.base_dir, self.store, self.buckets), source.path)
        else:
            if self._golden_topic is None:
                self._golden_topic = read_golden(self.settings)
            records = self._golden_topic
        return examples_from_golden(records, source=source.name)

    def phase_splits(self, phase_name: PhaseName) -> dict[str, list[Example]]:
        """train and eval mixes of one phase."""
        phase = self.recipe.phases[phase_name]
        seed = self.recipe.seed
        parts: dict[str, tuple[list[Example], list[Example]]] = {}
        for source in phase.sources:
            if not isinstance(source, NegativesSource):
                pool = self.load(source)
                parts[source.name] = split_by_task(
                    pool,
                    self.recipe.eval_fraction,
                    lambda task, name=source.name: seeded(seed, phase_name, "split", name, task),
                )
        for source in phase.sources:
            if isinstance(source, NegativesSource):
                train, evaluation = parts[source.of]
                parts[source.name] = tuple(  # type: ignore[assignment]
                    negatives(base, source.kinds, source=source.name, rng=seeded(seed, phase_name, source.name, split))
                    for base, split in ((train, "train"), (evaluation, "eval"))
                )
        ratios = {source.name: source.ratio for source in phase.sources}
        mixes = {}
        for index, split in enumerate(SPLITS):
            pools = {name: pair[index] for name, pair in parts.items()}
            size = phase.size if split == "train" else None
            mixes[split] = mix(pools, ratios, size, lambda name, split=split: seeded(seed, phase_name, split, name))
        return mixes

    def fetch_images(self, uris: list[str], root: Path) -> dict[str, ExportedImage]:
        exported = {}
        for uri in tqdm(uris, desc="images", unit="img", disable=None):
            data = _read_bytes(uri, self.base_dir, self.store, self.buckets)
            try:
                with Image.open(io.BytesIO(data)) as image:
                    width, height, kind = image.width, image.height, (image.format or "img").lower()
            except (UnidentifiedImageError, OSError):
                raise ExportError(f"{uri}: not an image Pillow can read") from None
            path = f"images/{hashlib.sha256(data).hexdigest()}.{'jpg' if kind == 'jpeg' else kind}"
            target = root / path
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            exported[uri] = ExportedImage(path, width, height)
        return exported

    def conversation(self, example: Example, images: dict[str, ExportedImage]) -> dict[str, Any]:
        exported = [images[image.uri] for image in example.images]
        answer = example.answer
        if exported and not isinstance(answer, str):
            answer = convert_boxes(answer, exported[0], self.recipe.target.family, self.max_pixels)
        return sharegpt_example(example.prompt, [image.path for image in exported], answer_text(answer))

    def write(self, root: Path) -> tuple[list[str], dict[str, Any]]:
        """Every file of the export under `root`; returns their relative paths and the manifest."""
        mixes = {phase: self.phase_splits(phase) for phase in sorted(self.recipe.phases)}
        uris = sorted(
            {
                image.uri
                for splits in mixes.values()
                for examples in splits.values()
                for example in examples
                for image in example.images
            }
        )
        images = self.fetch_images(uris, root)
        files: list[str] = []
        entries: list[tuple[PhaseName, str]] = []
        manifest: dict[str, Any] = {
            "recipe": self.recipe.name,
            "seed": self.recipe.seed,
            "images": len(set(image.path for image in images.values())),
            "phases": {},
        }
        for phase, splits in mixes.items():
            manifest["phases"][phase] = {}
            for split, examples in splits.items():
                if not examples:
                    continue
                relative = data_file(phase, split)
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                with (root / relative).open("w", encoding="utf-8") as out:
                    for example in tqdm(examples, desc=f"{phase} {split}", unit="ex", disable=None):
                        out.write(_dumps_line(self.conversation(example, images)) + "\n")
                files.append(relative)
                entries.append((phase, split))
                manifest["phases"][phase][split] = {
                    "examples": len(examples),
                    "by_source": dict(sorted(Counter(e.source for e in examples).items())),
                    "by_task": dict(sorted(Counter(e.task for e in examples).items())),
                }
            arguments = training_arguments(
                self.recipe, phase, has_eval=(phase, "eval") in entries, max_pixels=self.max_pixels
            )
            (root / f"{phase}.yaml").write_text(yaml.safe_dump(arguments, sort_keys=False, allow_unicode=True))
            files.append(f"{phase}.yaml")
        (root / "dataset_info.json").write_text(json.dumps(dataset_info(entries), indent=2, sort_keys=True) + "\n")
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        files += ["dataset_info.json", "manifest.json"]
        files += sorted({image.path for image in images.values()})
        return sorted(files), manifest

    def upload(self, root: Path, files: list[str], out: str) -> None:
        bucket, prefix = split_s3(out)
        prefix = prefix.strip("/")
        for relative in tqdm(files, desc="upload", unit="file", disable=None):
            key = f"{prefix}/{relative}" if prefix else relative
            self.store.fput_object(bucket, key, str(root / relative))


def export_dataset(recipe: Recipe, base_dir: Path, out: str, settings: Settings) -> ExportSummary:
    """Write the export of `recipe` to the directory `out`, or to `s3://bucket/prefix`."""
    exporter = _Exporter(recipe, base_dir, settings)
    if out.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="vlmflow-export-") as staging:
            files, manifest = exporter.write(Path(staging))
            exporter.upload(Path(staging), files, out)
        return ExportSummary(out, files, manifest)
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise ExportError(f"{out} exists and is not empty; export into a new directory")
    root.mkdir(parents=True, exist_ok=True)
    files, manifest = exporter.write(root)
    return ExportSummary(str(root), files, manifest)
