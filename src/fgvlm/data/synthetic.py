"""The embedded demo's synthetic world: drawn fine-grained benchmarks.

A *family* is one fine-grained benchmark: its classes are every combination of a few attributes
(shape x near-colour shade x size, stripe density x orientation x colour, ...), so classes differ
in subtle details. ``generate_world`` draws a family as an image-folder tree with captions
(pretraining) and LLaVA-style instructions (finetuning); ``write_vqa_tsv`` writes a small general
VQA benchmark in VLMEvalKit's TSV format. Everything is seeded: same arguments, same bytes.
"""

from __future__ import annotations

import io
import itertools
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from tqdm import tqdm

from fgvlm.io import atomic_path
from fgvlm.mcq import FINE_GRAINED_QUESTION, LETTERS, LLAVA_MCQ_INSTRUCTION, N_OPTIONS

SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges without alpha fringes
NOISE_SIGMA = 6.0  # per-pixel Gaussian noise (0-255 scale) added at the final resolution
MC_FRACTION = 0.3  # share of train images whose instruction is a 5-option multiple choice

RGB = tuple[int, int, int]
Drawer = Callable[[dict[str, str], np.random.Generator, int], tuple[Image.Image, dict[str, str]]]

BACKGROUNDS: dict[str, RGB] = {
    "pale grey": (205, 205, 205),
    "cream": (236, 226, 200),
    "light blue": (198, 218, 236),
    "mint": (204, 234, 214),
    "beige": (222, 208, 184),
}


@dataclass(frozen=True)
class Attribute:
    """One attribute of a family's classes, with the instruction turn that asks about it."""

    name: str
    values: tuple[str, ...]
    question: str  # may use {noun}
    answer: str  # uses {value}


@dataclass(frozen=True)
class Family:
    """A fine-grained benchmark: its classes are the product of its attributes' values."""

    name: str
    noun: str  # what the object is called in questions: "shape", "pattern", "critter"
    attributes: tuple[Attribute, ...]
    class_template: str  # class name from attribute values: "{size} {colour} {shape}"
    long_template: str  # detailed caption stating every attribute
    short_templates: tuple[str, ...]  # web-like alt texts, often missing the fine attributes
    draw: Drawer  # (attributes, rng, canvas px) -> (RGBA object layer, caption details)
    max_shift: float  # position jitter, fraction of the image side
    max_rotation: float  # rotation jitter, degrees

    def class_attributes(self) -> list[dict[str, str]]:
        """Every class's attribute values, in label order (sorted class folders)."""
        combos = itertools.product(*(a.values for a in self.attributes))
        classes = [dict(zip([a.name for a in self.attributes], c, strict=True)) for c in combos]
        return sorted(classes, key=lambda attrs: class_folder(self.class_name(attrs)))

    def class_name(self, attrs: dict[str, str]) -> str:
        """The readable class name of one attribute combination."""
        return self.class_template.format(**attrs)


def class_folder(name: str) -> str:
    """Folder name of a class: its name with spaces replaced by underscores."""
    return name.replace(" ", "_")


def _jitter(colour: RGB, rng: np.random.Generator, amount: int) -> RGB:
    """Shift each channel by up to ``amount``: shades vary within a class."""
    shift = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(colour) + shift, 0, 255))


def _polygon(cx: float, cy: float, radius: float, sides: int, start_deg: float) -> list:
    """Vertices of a regular polygon with the given circumradius."""
    angles = np.deg2rad(start_deg + 360.0 * np.arange(sides) / sides)
    return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]


# ---------------------------------------------------------------- family: shapes
SHAPE_COLOURS: dict[str, RGB] = {  # two near pairs: crimson/vermilion, navy/azure
    "crimson": (186, 24, 58),
    "vermilion": (226, 78, 36),
    "navy": (34, 48, 138),
    "azure": (48, 116, 212),
}
SHAPE_SIDES = {"triangle": (3, -90.0), "square": (4, 45.0), "hexagon": (6, 0.0)}
SHAPE_RADIUS = {"small": 0.21, "large": 0.33}  # circumradius, fraction of the side


def _draw_shape(
    attrs: dict[str, str], rng: np.random.Generator, canvas: int
) -> tuple[Image.Image, dict]:
    """A filled regular polygon of the class's size and colour, centred."""
    layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    sides, start = SHAPE_SIDES[attrs["shape"]]
    radius = canvas * SHAPE_RADIUS[attrs["size"]] * rng.uniform(0.92, 1.08)
    colour = _jitter(SHAPE_COLOURS[attrs["colour"]], rng, 10)
    points = _polygon(canvas / 2, canvas / 2, radius, sides, start)
    ImageDraw.Draw(layer).polygon(points, fill=(*colour, 255))
    return layer, {}


# ---------------------------------------------------------------- family: patterns
STRIPE_COLOURS: dict[str, RGB] = {
    "teal": (0, 124, 128),
    "jade": (0, 160, 104),
    "plum": (140, 62, 130),
}
STRIPE_PERIOD = {"fine": 0.14, "broad": 0.28}  # fraction of the side
STRIPE_ANGLE = {"horizontal": 0.0, "vertical": 90.0, "rising": 45.0, "falling": -45.0}


def _draw_stripes(
    attrs: dict[str, str], rng: np.random.Generator, canvas: int
) -> tuple[Image.Image, dict]:
    """A rounded square patch of parallel stripes with the class's period, angle and colour."""
    big = 2 * canvas  # draw oversized so that rotation leaves no empty corners
    period = canvas * STRIPE_PERIOD[attrs["density"]] * rng.uniform(0.92, 1.08)
    colour = _jitter(STRIPE_COLOURS[attrs["colour"]], rng, 10)
    stripes = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(stripes)
    y = -period + rng.uniform(0, period)  # random phase
    while y < big:
        draw.rectangle([0, y, big, y + period / 2], fill=(*colour, 255))
        y += period
    stripes = stripes.rotate(STRIPE_ANGLE[attrs["orientation"]], resample=Image.Resampling.NEAREST)
    layer = stripes.crop((canvas // 2, canvas // 2, canvas // 2 + canvas, canvas // 2 + canvas))
    half = canvas * 0.33 * rng.uniform(0.9, 1.05)
    box = [canvas / 2 - half, canvas / 2 - half, canvas / 2 + half, canvas / 2 + half]
    mask = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(mask).rounded_rectangle(box, radius=canvas * 0.06, fill=255)
    layer.putalpha(ImageChops.multiply(layer.getchannel("A"), mask))
    frame = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    ImageDraw.Draw(frame).rounded_rectangle(box, radius=canvas * 0.06, fill=(250, 250, 250, 255))
    frame.alpha_composite(layer)  # stripes on a white card: the gaps do not show the background
    return frame, {}


# ---------------------------------------------------------------- family: creatures
SKINS: dict[str, RGB] = {
    "moss": (108, 150, 62),
    "sand": (204, 172, 92),
    "rust": (172, 82, 50),
    "slate": (92, 110, 142),
    "lilac": (162, 122, 192),
}
BODY_HALF = {"round": (0.22, 0.22), "boxy": (0.23, 0.19), "long": (0.31, 0.14)}  # (w, h) / side


def _draw_creature(
    attrs: dict[str, str], rng: np.random.Generator, canvas: int
) -> tuple[Image.Image, dict]:
    """A little critter: body, legs, one or two eyes, and horns, a tail or spots."""
    layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    skin_name = str(rng.choice(list(SKINS)))  # nuisance: skin colour does not define the class
    skin = (*_jitter(SKINS[skin_name], rng, 10), 255)
    dark = (*(int(v * 0.55) for v in skin[:3]), 255)
    c = canvas / 2
    cy = canvas * 0.55
    w, h = (canvas * v * rng.uniform(0.94, 1.06) for v in BODY_HALF[attrs["body"]])
    line = max(1, round(canvas * 0.035))
    for side in (-1, 1):  # legs
        x = c + side * w * 0.5
        draw.rectangle([x - line, cy + h * 0.6, x + line, cy + h + canvas * 0.07], fill=dark)
    if attrs["feature"] == "horned":
        for side in (-1, 1):
            top = (c + side * w * 0.75, cy - h - canvas * 0.13)
            draw.line([(c + side * w * 0.35, cy - h * 0.8), top], fill=dark, width=line)
            r = canvas * 0.035
            draw.ellipse([top[0] - r, top[1] - r, top[0] + r, top[1] + r], fill=dark)
    if attrs["feature"] == "tailed":
        tail = [
            (c + w * 0.8, cy + h * 0.2),
            (c + w + canvas * 0.08, cy),
            (c + w + canvas * 0.1, cy - h),
        ]
        draw.line(tail, fill=dark, width=line + 1, joint="curve")
    box = [c - w, cy - h, c + w, cy + h]
    if attrs["body"] == "boxy":
        draw.rounded_rectangle(box, radius=canvas * 0.05, fill=skin)
    else:
        draw.ellipse(box, fill=skin)
    if attrs["feature"] == "spotted":
        for k in range(3):
            sx = c + (k - 1) * w * 0.55 + rng.uniform(-0.05, 0.05) * w
            sy = cy + h * rng.uniform(0.3, 0.5)
            r = canvas * 0.035
            draw.ellipse([sx - r, sy - r, sx + r, sy + r], fill=dark)
    eye_y = cy - h * 0.3
    eye_xs = [c] if attrs["eyes"] == "one-eyed" else [c - w * 0.38, c + w * 0.38]
    for ex in eye_xs:
        r, p = canvas * 0.06, canvas * 0.028
        draw.ellipse([ex - r, eye_y - r, ex + r, eye_y + r], fill=(250, 250, 250, 255))
        draw.ellipse([ex - p, eye_y - p, ex + p, eye_y + p], fill=(20, 20, 20, 255))
    return layer, {"skin": skin_name}


FAMILIES: dict[str, Family] = {
    "shapes": Family(
        name="shapes",
        noun="shape",
        attributes=(
            Attribute(
                "size", tuple(SHAPE_RADIUS), "Is the {noun} small or large?", "It is {value}."
            ),
            Attribute(
                "colour", tuple(SHAPE_COLOURS), "What colour is the {noun}?", "It is {value}."
            ),
            Attribute("shape", tuple(SHAPE_SIDES), "What shape is the object?", "It is a {value}."),
        ),
        class_template="{size} {colour} {shape}",
        long_template=(
            "A {size} {colour} {shape} on a {background} background, {position}. "
            "The {shape} is {size} and its colour is {colour}."
        ),
        short_templates=(
            "{shape}",
            "a {colour} {shape}",
            "{size} {shape} icon",
            "{shape} on {background} background",
            "{colour} {shape} clipart free download",
            "IMG_{num}",
            "{size} {colour} {shape}",
            "geometric {shape} shape",
            "{colour} shape",
        ),
        draw=_draw_shape,
        max_shift=0.12,
        max_rotation=15.0,
    ),
    "patterns": Family(
        name="patterns",
        noun="pattern",
        attributes=(
            Attribute(
                "density",
                tuple(STRIPE_PERIOD),
                "Are the stripes fine or broad?",
                "The stripes are {value}.",
            ),
            Attribute(
                "orientation",
                tuple(STRIPE_ANGLE),
                "Which way do the stripes run?",
                "They are {value}.",
            ),
            Attribute(
                "colour", tuple(STRIPE_COLOURS), "What colour are the stripes?", "They are {value}."
            ),
        ),
        class_template="{density} {orientation} {colour} stripes",
        long_template=(
            "A card of {density} {orientation} {colour} stripes on a {background} background, "
            "{position}. The stripes are {density}, their orientation is {orientation} "
            "and their colour is {colour}."
        ),
        short_templates=(
            "stripes",
            "{orientation} stripes",
            "{colour} striped pattern",
            "{density} stripes texture",
            "striped fabric swatch",
            "IMG_{num}",
            "{density} {orientation} {colour} stripes",
            "{colour} and white stripes wallpaper",
        ),
        draw=_draw_stripes,
        max_shift=0.1,
        max_rotation=7.0,
    ),
    "creatures": Family(
        name="creatures",
        noun="critter",
        attributes=(
            Attribute(
                "body",
                tuple(BODY_HALF),
                "What body shape does the {noun} have?",
                "Its body is {value}.",
            ),
            Attribute(
                "eyes",
                ("one-eyed", "two-eyed"),
                "How many eyes does the {noun} have?",
                "It is {value}.",
            ),
            Attribute(
                "feature",
                ("horned", "tailed", "spotted"),
                "What is special about the {noun}?",
                "It is {value}.",
            ),
        ),
        class_template="{body} {eyes} {feature} critter",
        long_template=(
            "A {body} {eyes} {feature} critter with {skin} skin on a {background} background, "
            "{position}. Its body is {body}, it is {eyes} and it is {feature}."
        ),
        short_templates=(
            "critter",
            "cute {body} critter",
            "{feature} monster cartoon",
            "{eyes} creature",
            "little {skin} {feature} critter",
            "IMG_{num}",
            "{body} {eyes} {feature} critter",
            "alien doodle",
        ),
        draw=_draw_creature,
        max_shift=0.08,
        max_rotation=10.0,
    ),
}


def get_family(name: str) -> Family:
    """Look up a family, naming the valid ones when ``name`` is unknown."""
    if name not in FAMILIES:
        raise ValueError(f"unknown synthetic family {name!r}; valid: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def _position_phrase(dx: float, dy: float) -> str:
    """Describe a shift (fractions of the side, y down) in words."""
    vert = "top" if dy < -0.04 else "bottom" if dy > 0.04 else ""
    horiz = "left" if dx < -0.04 else "right" if dx > 0.04 else ""
    if not vert and not horiz:
        return "in the centre"
    return "towards the " + " ".join(p for p in (vert, horiz) if p)


def _background(rng: np.random.Generator, canvas: int) -> tuple[Image.Image, str]:
    """A light, randomly tinted background with a few faint clutter marks."""
    name = str(rng.choice(list(BACKGROUNDS)))
    base = _jitter(BACKGROUNDS[name], rng, 12)
    image = Image.new("RGB", (canvas, canvas), base)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, canvas, size=2)
        r = canvas * rng.uniform(0.02, 0.06)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_jitter(base, rng, 25))
    return image, name


def _finish(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Downsample to ``size`` and add pixel noise."""
    small = np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    noisy = small + rng.normal(0.0, NOISE_SIGMA, size=small.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def render_object(
    family: Family, attrs: dict[str, str], rng: np.random.Generator, image_size: int
) -> tuple[Image.Image, dict[str, str]]:
    """Draw one image of a class: its object jittered in position and angle on a noisy background.

    Returns the RGB image and the caption details (background, position, family extras).
    """
    canvas = image_size * SUPERSAMPLE
    image, bg_name = _background(rng, canvas)
    layer, details = family.draw(attrs, rng, canvas)
    angle = rng.uniform(-family.max_rotation, family.max_rotation)
    dx, dy = rng.uniform(-family.max_shift, family.max_shift, size=2)
    layer = layer.rotate(
        angle, resample=Image.Resampling.NEAREST, translate=(dx * canvas, dy * canvas)
    )
    image.paste(layer, (0, 0), layer)
    details = {**details, "background": bg_name, "position": _position_phrase(dx, dy)}
    return _finish(image, image_size, rng), details


def _png_bytes(image: Image.Image) -> bytes:
    """PNG-encode without metadata (no timestamps: same pixels, same bytes)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _article(phrase: str) -> str:
    """'a' or 'an' for a phrase."""
    return "an" if phrase[0].lower() in "aeiou" else "a"


def _mc_options(
    classes: list[dict[str, str]], label: int, rng: np.random.Generator
) -> tuple[list[int], int]:
    """Four hard distractors (classes sharing attributes are likelier) + the answer, shuffled."""
    shared = np.array(
        [sum(c[k] == v for k, v in classes[label].items()) for c in classes], dtype=np.float64
    )
    weights = 4.0**shared
    weights[label] = 0.0
    distractors = rng.choice(
        len(classes), size=N_OPTIONS - 1, replace=False, p=weights / weights.sum()
    )
    options = [label, *(int(d) for d in distractors)]
    order = rng.permutation(N_OPTIONS)
    options = [options[i] for i in order]
    return options, options.index(label)


def _conversation(
    family: Family,
    classes: list[dict[str, str]],
    label: int,
    rng: np.random.Generator,
    mc_fraction: float,
    naming_fraction: float = 0.5,
) -> list[dict[str, str]]:
    """One LLaVA-style conversation about an image of class ``label``: a 5-option question
    (``mc_fraction``), else a naming question (``naming_fraction`` of the rest), else two
    attribute questions."""
    attrs = classes[label]
    name = family.class_name(attrs)
    kind = rng.uniform()
    if kind < mc_fraction:
        options, answer = _mc_options(classes, label, rng)
        lines = [f"{LETTERS[i]}. {family.class_name(classes[o])}" for i, o in enumerate(options)]
        prompt = "\n".join([FINE_GRAINED_QUESTION, *lines, LLAVA_MCQ_INSTRUCTION])
        return [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": LETTERS[answer]},
        ]
    if kind < mc_fraction + (1 - mc_fraction) * naming_fraction:
        question = str(
            rng.choice(
                [
                    FINE_GRAINED_QUESTION,
                    "What is the object in this image?",
                    "What is shown in this picture?",
                    f"Identify the {family.noun} in the image.",
                ]
            )
        )
        answer = name if question == FINE_GRAINED_QUESTION else f"It is {_article(name)} {name}."
        return [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ]
    turns = []
    for i, a in enumerate(rng.choice(len(family.attributes), size=2, replace=False)):
        attribute = family.attributes[int(a)]
        question = attribute.question.format(noun=family.noun)
        turns.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": attribute.answer.format(value=attrs[attribute.name])})
    return turns


def _captions(
    family: Family, attrs: dict[str, str], details: dict[str, str], rng: np.random.Generator
) -> tuple[str, str]:
    """(short web-like alt text, long caption stating every attribute)."""
    fields = {**attrs, **details, "num": f"{int(rng.integers(0, 10000)):04d}"}
    short = str(rng.choice(family.short_templates)).format(**fields)
    return short, family.long_template.format(**fields)


def generate_world(
    out_dir: Path,
    *,
    family: str,
    seed: int,
    image_size: int = 32,
    train_per_class: int = 40,
    test_per_class: int = 10,
    mc_fraction: float = MC_FRACTION,
    naming_fraction: float = 0.5,
) -> dict[str, Any]:
    """Draw one family as an image-folder benchmark with captions and instructions.

    Writes atomically ``out_dir/{train,test}/<class_folder>/<nnnn>.png``, ``classes.json`` (class
    names in label order = sorted class folders), ``attributes.json`` ({class name: {attribute:
    value}}), ``captions.jsonl`` ({"image", "short", "long"} per train image) and
    ``instructions.jsonl`` (LLaVA conversations per train image; a ``mc_fraction`` share are
    5-option multiple-choice questions answered with the letter). Image paths in the JSONL files
    are relative to ``out_dir``. Returns a summary: family, seed, classes, counts.
    """
    spec = get_family(family)
    if image_size < 8 or train_per_class < 1 or test_per_class < 0:
        raise ValueError(
            f"generate_world: need image_size >= 8, train_per_class >= 1, test_per_class >= 0 "
            f"(got {image_size}, {train_per_class}, {test_per_class})"
        )
    classes = spec.class_attributes()
    names = [spec.class_name(attrs) for attrs in classes]
    family_id = zlib.crc32(family.encode())  # independent streams per family for one seed
    splits = {"train": (0, train_per_class), "test": (1, test_per_class)}
    captions, instructions = [], []
    with atomic_path(out_dir, is_dir=True) as tmp:
        jobs = [(label, split) for label in range(len(classes)) for split in splits]
        for label, split in tqdm(jobs, desc=f"synthetic {family}", unit="class-split"):
            split_id, count = splits[split]
            folder = tmp / split / class_folder(names[label])
            folder.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([seed, family_id, split_id, label, i])
                image, details = render_object(spec, classes[label], rng, image_size)
                (folder / f"{i:04d}.png").write_bytes(_png_bytes(image))
                if split != "train":
                    continue
                relative = f"{split}/{folder.name}/{i:04d}.png"
                text_rng = np.random.default_rng([seed, family_id, 2, label, i])
                short, long = _captions(spec, classes[label], details, text_rng)
                captions.append({"image": relative, "short": short, "long": long})
                conversation = _conversation(
                    spec, classes, label, text_rng, mc_fraction, naming_fraction
                )
                instructions.append({"image": relative, "conversations": conversation})
        for i, record in enumerate(instructions):
            record_id = f"{family}-{i:06d}"
            instructions[i] = {"id": record_id, **record}
        (tmp / "classes.json").write_text(json.dumps(names, indent=2) + "\n")
        attributes = {name: attrs for name, attrs in zip(names, classes, strict=True)}
        (tmp / "attributes.json").write_text(json.dumps(attributes, indent=2) + "\n")
        _write_jsonl(tmp / "captions.jsonl", captions)
        _write_jsonl(tmp / "instructions.jsonl", instructions)
    return {
        "family": family,
        "seed": seed,
        "image_size": image_size,
        "classes": names,
        "num_classes": len(names),
        "counts": {"train": train_per_class * len(names), "test": test_per_class * len(names)},
        "captions": len(captions),
        "instructions": len(instructions),
    }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, UTF-8."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ---------------------------------------------------------------- reading drawn worlds back


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def caption_pairs(world_dirs: list[Path]) -> list[tuple[Path, str]]:
    """(train image, text) pairs of drawn worlds for CLIP pretraining: each image with
    "a photo of a <class>" and with its long caption."""
    pairs = []
    for world in world_dirs:
        for row in _read_jsonl(world / "captions.jsonl"):
            image = world / row["image"]
            classname = image.parent.name.replace("_", " ")
            pairs += [(image, f"a photo of a {classname}"), (image, row["long"])]
    return pairs


def text_corpus(world_dirs: list[Path]) -> list[str]:
    """Text of drawn worlds (captions of both qualities, instruction turns) for tiny LMs."""
    lines: list[str] = []
    for world in world_dirs:
        for row in _read_jsonl(world / "captions.jsonl"):
            lines += [row["short"], row["long"]]
        for row in _read_jsonl(world / "instructions.jsonl"):
            lines += [turn["value"].replace("<image>", "").strip() for turn in row["conversations"]]
    return [line for line in lines if line]
