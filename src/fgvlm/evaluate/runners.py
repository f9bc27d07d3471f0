"""VLM runners behind one interface (``fgvlm.mcq.MCQModel``).

- ``LlavaRunner``: the project's own LLaVA-style checkpoints (``fgvlm.models.vlm``), prompted in
  their chat template with the image placeholder before the question, as LLaVA-1.5 does.
- ``fgvlm.evaluate.hub_runner.HubVLM``: released VLMs through transformers.
- ``fgvlm.evaluate.remote_runners``: released VLMs that ship their own modelling code.

``load_runner`` picks one from a model spec; ``question_source`` turns a benchmark (question
shards or a VLMEvalKit TSV) into items and answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fgvlm.evaluate.prompts import ASSISTANT_PREFIX
from fgvlm.mcq import MCQItem
from fgvlm.models.templates import IMAGE_PLACEHOLDER, answer_ids, prompt_ids


class LlavaRunner:
    """Greedy answers and continuation likelihoods of a ``LlavaVLM``."""

    def __init__(self, vlm, name: str) -> None:
        self.vlm = vlm.eval()
        self.name = name

    def _prompt(self, item: MCQItem) -> list[int]:
        if item.extra_images:  # LLaVA's eval code shows one image
            raise ValueError(f"{self.name}: question {item.qid} has several images; it takes one")
        text = item.prompt if item.image is None else f"{IMAGE_PLACEHOLDER}\n{item.prompt}"
        return prompt_ids(self.vlm.template, self.vlm.tokenizer, text)

    @torch.no_grad()
    def generate(self, items: list[MCQItem], *, max_new_tokens: int) -> list[str]:
        prompts = [self._prompt(item) for item in items]
        pixels = self.vlm.pixel_batch([item.image for item in items])
        answers = self.vlm.generate_ids(prompts, pixels, max_new_tokens)
        return [self.vlm.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]

    def prompt_length(self, item: MCQItem) -> int:
        """LM positions of the item's prompt, the image's patch tokens included: the key
        ``fgvlm.evaluate.scoring`` sorts a part's batches by."""
        image = 0 if item.image is None else self.vlm.vision.num_patches - 1
        return len(self._prompt(item)) + image

    @torch.no_grad()
    def continuation_logprobs(
        self, items: list[MCQItem], continuations: list[list[str]]
    ) -> list[list[float]]:
        """Per item, the summed log-probability of each continuation after the prompt; each
        prompt (image included) is encoded once and its KV cache shared by its continuations."""
        prompts = [self._prompt(item) for item in items]
        conts = [
            [answer_ids(self.vlm.template, self.vlm.tokenizer, text) for text in texts]
            for texts in continuations
        ]
        pixels = self.vlm.pixel_batch([item.image for item in items])
        return self.vlm.shared_prefix_logprobs(prompts, conts, pixels)


DTYPES = ("auto", "bfloat16", "float32")


def eval_dtype(dtype: str, device: str) -> str | None:
    """The dtype a model is evaluated in: ``evaluation.dtype`` resolved on ``device``.

    ``auto``: bfloat16 on CUDA; on CPU None (float32 for our checkpoints, the checkpoint's own
    dtype for released ones).
    """
    if dtype not in DTYPES:
        raise ValueError(f"evaluation dtype {dtype!r}: choose one of {DTYPES}")
    if dtype == "auto":
        return "bfloat16" if torch.device(device).type == "cuda" else None
    return dtype


def load_runner(spec: dict, model_dir: Path, *, device: str = "cpu", dtype: str = "auto"):
    """A runner for ``spec`` = {"runner": "trained"|"hub", "name", ...} with weights in ``model_dir``.

    Hub specs with ``trust_remote_code`` and a family of ``fgvlm.models.remote.FAMILIES``
    (InternVL2, Phi-3-vision, Molmo, CogVLM: each its own model API) load through
    ``fgvlm.evaluate.remote_runners``; every other hub spec through
    ``fgvlm.evaluate.hub_runner``. ``dtype``: ``evaluation.dtype`` (``eval_dtype``); on CUDA,
    float32 matmuls left (our frozen vision tower) may use TF32.
    """
    resolved = eval_dtype(dtype, device)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if spec["runner"] == "trained":
        from fgvlm.models.vlm import load_vlm

        vlm = load_vlm(model_dir, device=device, dtype=getattr(torch, resolved or "float32"))
        return LlavaRunner(vlm, spec["name"])
    if spec["runner"] == "hub":
        from fgvlm.models.remote import FAMILIES

        if spec.get("trust_remote_code") and spec.get("family") in FAMILIES:
            from fgvlm.evaluate.remote_runners import load_remote_vlm

            return load_remote_vlm(
                model_dir,
                spec["family"],
                trust_remote_code=True,
                device=device,
                dtype=resolved,
                name=spec["name"],
                processor_kwargs=spec.get("processor_kwargs"),
                image=spec.get("image"),
            )
        from fgvlm.evaluate.hub_runner import load_hub_vlm

        return load_hub_vlm(
            model_dir,
            trust_remote_code=spec.get("trust_remote_code", False),
            device=device,
            dtype=resolved,
            name=spec["name"],
            answer_prefix=ASSISTANT_PREFIX.get(spec["style"], ""),
            system_prompt=spec.get("system_prompt"),
            pad_to_square=(spec.get("image") or {}).get("pad_to_square", False),
            processor_kwargs=spec.get("processor_kwargs"),
        )
    raise ValueError(f"model kind {spec['kind']!r} is not supported (trained, hub)")


def question_source(
    benchmark: dict, path: Path, questions_path: Path | None = None, *, all_images: bool = False
) -> tuple[
    Callable[[], Iterator[Any]],
    Callable[[Any], tuple[dict, Image.Image]],
    dict[str, str],
    dict,
]:
    """(a fresh-stream factory of raw samples, the function decoding one into (record, RGB
    image), qid -> answer letter, counts) of a benchmark. Both functions pickle, so that loader
    workers can decode while the model runs.

    ``benchmark`` = {"format": "questions"} for question shards at ``path`` (answers from the
    questions file; their count was checked when the manifest was built), or {"format":
    "vlmeval_tsv", "split", "expected_count", "accept_count_mismatch"} for a VLMEvalKit TSV file:
    its scored questions (CircularEval groups) are checked against ``expected_count``, and counts
    then include what was skipped, each question's CircularEval group and category. A TSV
    record carries every image (``images``); the stream's image is the first, and with
    ``all_images`` (a model that takes several) the decoded record holds the others as
    ``extra_images``.
    """
    if benchmark["format"] == "questions":
        import polars as pl

        from fgvlm.data.shards import decode_sample, iter_question_samples

        if questions_path is None:
            raise ValueError("question shards need their questions file for the answer key")
        key = pl.read_parquet(questions_path, columns=["qid", "answer"])
        answers = dict(zip(key["qid"].to_list(), key["answer"].to_list(), strict=True))
        raw = partial(iter_question_samples, path, decode=False)
        return raw, decode_sample, answers, {"questions": len(answers)}
    if benchmark["format"] == "vlmeval_tsv":
        from fgvlm.data.vlmeval import check_count, scan_vlmeval_tsv

        records, counts = scan_vlmeval_tsv(path, split=benchmark.get("split"))
        check_count(
            counts,
            benchmark["expected_count"],
            path,
            accept=benchmark["accept_count_mismatch"],
        )
        answers = {r["qid"]: r["answer"] for r in records}
        counts = {
            **counts,
            "expected_count": benchmark["expected_count"],
            "groups": {r["qid"]: r["group"] for r in records if r["group"] != r["qid"]},
            "categories": {r["qid"]: str(r.get("category") or "") for r in records},
        }
        decode = partial(_decode_tsv_record, all_images=all_images)
        return partial(iter, records), decode, answers, counts
    raise ValueError(f"benchmark kind {benchmark['kind']!r} is not supported")


def _decode_rgb(data: bytes) -> Image.Image:
    with Image.open(BytesIO(data)) as image:
        return image.convert("RGB")


def _decode_tsv_record(record: dict, *, all_images: bool = False) -> tuple[dict, Image.Image]:
    """(record, its first image); with ``all_images`` a copy of the record whose
    ``extra_images`` are the others, decoded (the shared record is never changed)."""
    if all_images and len(record.get("images", ())) > 1:
        record = {**record, "extra_images": [_decode_rgb(b) for b in record["images"][1:]]}
    return record, _decode_rgb(record["image"])
