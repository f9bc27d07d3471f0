"""What a multiple-choice question is, for every module that builds, asks or scores one.

The paper asks every fine-grained question as ``FINE_GRAINED_QUESTION`` with ``N_OPTIONS``
lettered options (the class and its hardest negatives); a model sees an ``MCQItem`` and answers
through the ``MCQModel`` protocol. This module imports nothing from fgvlm.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

LETTERS = string.ascii_uppercase
N_OPTIONS = 5
FINE_GRAINED_QUESTION = "What type of object is in this photo?"
LLAVA_MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class MCQItem:
    """One multiple-choice question as a model sees it.

    ``prompt`` is the full user text (question, lettered options, the answer instruction);
    the runner adds its chat template and places ``image`` (None: a text-only question).
    ``cloze_prompt`` (optional) is the question alone, after which ``option_likelihood``
    scores each option's text. ``extra_images``: the question's further images, in order, for
    models that take several (an MMMU question may show up to seven); empty for the others.
    """

    qid: str
    image: Image.Image | None
    prompt: str
    options: list[str]
    cloze_prompt: str | None = None
    extra_images: tuple[Image.Image, ...] = ()

    @property
    def images(self) -> tuple[Image.Image, ...]:
        """Every image of the question, in order (none for a text-only question)."""
        return () if self.image is None else (self.image, *self.extra_images)


@runtime_checkable
class MCQModel(Protocol):
    """What a VLM runner implements so that every scoring mode works with it."""

    name: str

    def generate(self, items: list[MCQItem], *, max_new_tokens: int) -> list[str]:
        """Greedy answers (new text only), one per item, independent of the batch size."""
        ...

    def continuation_logprobs(
        self, items: list[MCQItem], continuations: list[list[str]]
    ) -> list[list[float]]:
        """Per item, the summed token log-probabilities of each continuation as the model's
        answer right after the prompt (its chat template's answer prefix included)."""
        ...


def option_letters(item: MCQItem) -> list[str]:
    """The letters of ``item``'s options: "A", "B", ... (at least two options, at most 26)."""
    if not 2 <= len(item.options) <= len(LETTERS):
        raise ValueError(
            f"question {item.qid}: needs 2 to {len(LETTERS)} options, got {len(item.options)}"
        )
    return list(LETTERS[: len(item.options)])
