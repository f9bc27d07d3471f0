"""The embedded demo's general VQA benchmarks: small seeded sets in VLMEvalKit's TSV formats.

Each style mimics one benchmark's file (MMBench with CircularEval copies and hints, MMMU with
its splits, MMStar): coloured shapes on a grid, asked about colour, shape, count, presence or
position, so the reader, the prompts and the scoring run on the real formats.
"""

from __future__ import annotations

import base64
import io
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image, ImageDraw

from fgvlm.data.synthetic import RGB, SUPERSAMPLE, _finish, _jitter, _polygon
from fgvlm.io import atomic_path
from fgvlm.mcq import LETTERS

MMMU_OPTION_COLUMNS = 9  # VLMEvalKit's MMMU TSV has option columns A-I

# ---------------------------------------------------------------- general VQA (VLMEvalKit TSV)
VQA_COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (240, 130, 30),
}
VQA_SHAPES = ("circle", "square", "triangle", "diamond")
VQA_STYLES = ("mmbench", "mmmu", "mmstar")
# question kind -> category, l2 category per style (names modelled on each benchmark's taxonomy)
VQA_CATEGORIES = {
    "mmbench": {
        "colour": ("attribute_recognition", "finegrained_perception (instance-level)"),
        "shape": ("object_localization", "finegrained_perception (instance-level)"),
        "count": ("image_scene", "coarse_perception"),
        "exists": ("attribute_comparison", "finegrained_perception (cross-instance)"),
        "position": ("spatial_relationship", "finegrained_perception (cross-instance)"),
    },
    "mmstar": {
        "colour": ("fine-grained perception", "attribute & celebrity recognition"),
        "shape": ("coarse perception", "image scene and topic"),
        "count": ("fine-grained perception", "object counting"),
    },
    "mmmu": {
        "colour": ("Art", ""),
        "shape": ("Math", ""),
        "count": ("Math", ""),
        "exists": ("Design", ""),
        "position": ("Geography", ""),
    },
}
VQA_HINTS = ("The image shows simple coloured shapes.", "Look at the whole image.")


def _scene(rng: np.random.Generator, n_objects: int, image_size: int) -> tuple[Image.Image, list]:
    """Draw ``n_objects`` coloured shapes in distinct cells of a 2x2 grid (1: left or right half).

    Returns the image and the objects as (shape, colour, x-centre fraction).
    """
    canvas = image_size * SUPERSAMPLE
    grey = int(rng.integers(225, 250))
    image = Image.new("RGB", (canvas, canvas), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    if n_objects == 1:
        cells = [(float(rng.choice([0.27, 0.73])), 0.5)]
        radius = 0.2
    else:
        grid = [(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)]
        cells = [grid[int(i)] for i in rng.choice(4, size=n_objects, replace=False)]
        radius = 0.17
    objects = []
    for cx, cy in cells:
        shape = str(rng.choice(VQA_SHAPES))
        colour = str(rng.choice(list(VQA_COLOURS)))
        x = (cx + rng.uniform(-0.04, 0.04)) * canvas
        y = (cy + rng.uniform(-0.04, 0.04)) * canvas
        r = radius * canvas * rng.uniform(0.9, 1.1)
        fill = _jitter(VQA_COLOURS[colour], rng, 8)
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            sides, start = {"square": (4, 45.0), "triangle": (3, -90.0), "diamond": (4, 0.0)}[shape]
            draw.polygon(_polygon(x, y, r, sides, start), fill=fill)
        objects.append((shape, colour, cx))
    return _finish(image, image_size, rng), objects


def _vqa_question(
    kind: str, objects: list, rng: np.random.Generator, n_options: int
) -> tuple[str, list[str], int]:
    """(question, options, answer position) of one question kind about a scene's objects."""
    shape, colour, cx = objects[0]
    if kind == "colour":
        question, correct, pool = (
            "What colour is the shape in the image?",
            colour,
            list(VQA_COLOURS),
        )
    elif kind == "shape":
        question, correct, pool = "Which shape is shown in the image?", shape, list(VQA_SHAPES)
    elif kind == "count":
        question, correct = "How many shapes are in the image?", str(len(objects))
        pool = [str(n) for n in range(1, 6)]
    elif kind == "position":
        question, correct, pool = (
            "Is the shape on the left or the right?",
            "left" if cx < 0.5 else "right",
            ["left", "right"],
        )
    else:  # exists: a yes/no question, true half of the time
        probe = (
            (shape, colour)
            if rng.uniform() < 0.5
            else (str(rng.choice(VQA_SHAPES)), str(rng.choice(list(VQA_COLOURS))))
        )
        present = any((s, c) == probe for s, c, _ in objects)
        question = f"Is there a {probe[1]} {probe[0]} in the image?"
        correct, pool = ("Yes" if present else "No"), ["Yes", "No"]
    others = [p for p in pool if p != correct]
    k = min(n_options, len(pool)) - 1
    options = [correct, *(others[int(i)] for i in rng.choice(len(others), size=k, replace=False))]
    options = [options[int(i)] for i in rng.permutation(len(options))]
    return question, options, options.index(correct)


def _b64_image(image: Image.Image, fmt: str) -> str:
    """Base64 of a JPEG or PNG encoding, as VLMEvalKit TSVs store images."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _vqa_items(style: str, n_questions: int, image_size: int, seed: int) -> list[dict]:
    """The questions of one style: dicts with index, question, options, answer, kind, image."""
    rng = np.random.default_rng([seed, zlib.crc32(style.encode())])
    kinds = list(VQA_CATEGORIES[style])
    fmt = "PNG" if style == "mmmu" else "JPEG"
    max_options = {"mmbench": 4, "mmmu": 5, "mmstar": 4}[style]
    items: list[dict] = []
    circular: list[dict] = []
    while len(items) + len(circular) < n_questions:
        kind = str(rng.choice(kinds))
        n_objects = int(rng.integers(1, 5)) if kind in ("count", "exists") else 1
        image, objects = _scene(rng, n_objects, image_size)
        n_options = 4 if style == "mmstar" else int(rng.integers(2, max_options + 1))
        question, options, answer = _vqa_question(kind, objects, rng, n_options)
        base = {"index": len(items), "kind": kind, "image": _b64_image(image, fmt)}
        item = {**base, "question": question, "options": options, "answer": answer}
        if style == "mmmu":
            item = _mmmu_variant(item, rng, image_size, fmt)
        items.append(item)
        if style != "mmbench":
            continue
        follow = [k for k in ("colour", "shape", "position") if n_objects == 1 and k != kind]
        if follow and rng.uniform() < 0.25 and len(items) + len(circular) < n_questions:
            # MMBench quirk: a further question on the same image stores the image row's index
            other = str(rng.choice(follow))
            q, opts, ans = _vqa_question(other, objects, rng, int(rng.integers(2, 5)))
            items.append(
                {
                    "index": len(items),
                    "kind": other,
                    "image": str(base["index"]),
                    "question": q,
                    "options": opts,
                    "answer": ans,
                }
            )
        rotations = len(options) - 1
        if rng.uniform() < 0.3 and len(items) + len(circular) + rotations <= n_questions:
            # MMBench CircularEval copies: options rotated, index + k * 1e6, image by reference
            for k in range(1, len(options)):
                rotated = options[k:] + options[:k]
                circular.append(
                    {
                        **base,
                        "index": base["index"] + k * 1_000_000,
                        "image": str(base["index"]),
                        "question": question,
                        "options": rotated,
                        "answer": rotated.index(options[answer]),
                    }
                )
    return items + circular


def _mmmu_variant(item: dict, rng: np.random.Generator, image_size: int, fmt: str) -> dict:
    """MMMU's other question forms, drawn now and then: an open question (no options, the
    answer is the text) or a question about the second of two images."""
    draw = rng.uniform()
    if draw < 0.15 and item["kind"] in ("colour", "shape", "count"):
        return {**item, "open": True}
    if draw < 0.3:
        second, objects = _scene(rng, 1, image_size)
        question, options, answer = _vqa_question("colour", objects, rng, int(rng.integers(2, 6)))
        return {
            **item,
            "image": [item["image"], _b64_image(second, fmt)],
            "question": f"In the second image: {question}",
            "options": options,
            "answer": answer,
        }
    return item


def _vqa_row(style: str, item: dict, split: str, rng: np.random.Generator) -> dict[str, Any]:
    """One TSV row of ``style`` from a question item."""
    letters = LETTERS[:MMMU_OPTION_COLUMNS] if style == "mmmu" else LETTERS[:4]
    options = {letter: None for letter in letters}
    options.update(zip(LETTERS, item["options"], strict=False))
    category, l2_category = VQA_CATEGORIES[style][item["kind"]]
    answer = LETTERS[item["answer"]]
    if style == "mmbench":
        hint = str(rng.choice(VQA_HINTS)) if rng.uniform() < 0.2 else None
        return {
            "index": item["index"],
            "question": item["question"],
            "hint": hint,
            **options,
            "answer": answer,
            "category": category,
            "image": item["image"],
            "source": "synthetic",
            "l2-category": l2_category,
            "split": "dev",
        }
    if style == "mmmu":
        images = item["image"] if isinstance(item["image"], list) else [item["image"]]
        tags = " ".join(f"<image {k}>" for k in range(1, len(images) + 1))
        names = [f"{item['index']}--{k}.png" for k in range(1, len(images) + 1)]
        if item.get("open"):  # no options; the answer is the text itself
            options = {letter: None for letter in letters}
            answer = item["options"][item["answer"]]
        return {
            "index": item["index"],
            "question": f"{tags} {item['question']}",
            **options,
            "answer": answer,
            "category": category,
            # pandas writes a list cell as a Python list (VLMEvalKit reads it with eval)
            "image": str(images) if len(images) > 1 else images[0],
            "image_path": str(names) if len(images) > 1 else f"{item['index']}.png",
            "id": f"{split}_{category}_{item['index'] + 1}",
            "split": split,
            "question_type": "open" if item.get("open") else "multiple-choice",
        }
    return {
        "index": item["index"],
        "question": item["question"],
        **options,
        "answer": answer,
        "category": category,
        "l2_category": l2_category,
        "image": item["image"],
    }


def write_vqa_tsv(
    out_path: Path,
    *,
    seed: int,
    n_questions: int = 60,
    image_size: int = 32,
    style: str = "mmbench",
) -> None:
    """Write a synthetic general-VQA benchmark (colour, shape, count, ...) as a VLMEvalKit TSV.

    ``n_questions`` rows with 2-5 options (MMStar style: 4), base64 images, and each style's quirks:
    - mmbench (MMBench_DEV_EN): index, question, hint (mostly empty), A-D, answer, category,
      image, source, l2-category, split. Some rows' ``image`` holds another row's index (a further
      question on the same image, and CircularEval copies with index + k * 1,000,000 whose options
      are rotated).
    - mmmu (MMMU_DEV_VAL): index, question ("<image 1> ..."), A-I (empty beyond the options),
      answer, category, image (PNG), image_path, id, split ("dev" for the first seventh, then
      "validation"), question_type. Some questions are open (no options, the answer is the text;
      question_type "open"), some are about two images ("<image 1> <image 2> ...", the image
      cell a list of both and image_path their names).
    - mmstar (MMStar): index, question, A-D, answer, category, l2_category, image.
    """
    if style not in VQA_STYLES:
        raise ValueError(f"unknown VQA style {style!r}; valid: {', '.join(VQA_STYLES)}")
    if n_questions < 1:
        raise ValueError(f"write_vqa_tsv: n_questions must be >= 1 (got {n_questions})")
    items = _vqa_items(style, n_questions, image_size, seed)
    rng = np.random.default_rng([seed, zlib.crc32(style.encode()), 1])
    n_dev = max(1, n_questions // 7)
    rows = [
        _vqa_row(style, item, "dev" if i < n_dev else "validation", rng)
        for i, item in enumerate(items)
    ]
    frame = pl.DataFrame(rows, schema={k: pl.Int64 if k == "index" else pl.String for k in rows[0]})
    with atomic_path(out_path) as tmp:
        frame.write_csv(tmp, separator="\t")
