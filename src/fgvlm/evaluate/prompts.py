"""Multiple-choice prompts in each VLM family's VLMEvalKit wording (paper §3.3, Appendix B).

The paper asks every fine-grained question as "What type of object is in this photo?" with the
options as "A. …" lines, followed by "each model's corresponding format from VLMEvalKit". A
*style* is one such format; ``mcq_prompt`` builds the user text (the image placement and the
chat template are the runner's). Every style below is transcribed from VLMEvalKit
(github.com/open-compass/VLMEvalKit); the source of each is named next to it. The Chinese
variants ("请直接回答选项字母。", used when the question contains CJK text) are not reproduced:
every benchmark here is English.
"""

from __future__ import annotations

import re

from fgvlm.mcq import LETTERS, LLAVA_MCQ_INSTRUCTION

VLMEVALKIT_MCQ_INSTRUCTION = "Please select the correct answer from the options above."

# style -> where VLMEvalKit builds that wording
STYLE_SOURCES = {
    # vlmeval/vlm/llava/llava.py LLaVA.build_prompt and LLaVA_Next.build_prompt;
    # vlmeval/vlm/internvl/utils.py build_multi_choice_prompt (InternVL2) is the same text
    "llava": "LLaVA-1.5 / LLaVA-NeXT / InternVL2 MCQ prompt",
    # vlmeval/dataset/image_mcq.py ImageMCQDataset.build_prompt: models without their own
    # MCQ prompt (Phi-3/3.5-vision) receive the dataset's
    "vlmevalkit_default": "ImageMCQDataset.build_prompt",
    # vlmeval/vlm/qwen2_vl/prompt.py Qwen2VLPromptMixin._build_mcq_prompt (and the identical
    # _build_mmmu_prompt): the dataset wording without the trailing " \n"
    "qwen2_vl": "Qwen2VLPromptMixin._build_mcq_prompt",
    # vlmeval/vlm/idefics.py IDEFICS2.build_prompt_puremcq (MMStar, AI2D, SEEDBench, ScienceQA;
    # Idefics3 uses the same class): dataset wording with "Choices:" and "Answer with the letter."
    "idefics2": "IDEFICS2.build_prompt_puremcq",
    # vlmeval/vlm/idefics.py IDEFICS2.build_prompt_mmbench: the question before the hint
    "idefics2_mmbench": "IDEFICS2.build_prompt_mmbench",
    # vlmeval/vlm/idefics.py IDEFICS2.build_prompt_default (datasets in none of its lists, e.g.
    # a custom MCQ): the dataset wording stripped, no "Answer:" lead
    "idefics2_default": "IDEFICS2.build_prompt_default",
    # vlmeval/vlm/idefics.py IDEFICS2.build_prompt_mmmu: "Question:" dropped, "Choices:",
    # " <image k> " where split_MMMU cut the text (its "<image k>:<image>" header is not built)
    "idefics2_mmmu": "IDEFICS2.build_prompt_mmmu",
    # vlmeval/dataset/image_mcq.py MMMUDataset.split_MMMU + vlmeval/vlm/base.py
    # message_to_promptimg: the dataset wording cut at "<image k>", parts joined by "\n"
    "vlmevalkit_default_mmmu": "MMMUDataset.build_prompt, text parts joined",
    # vlmeval/vlm/molmo.py molmo.build_prompt, then split_MMMU, parts joined by "\n"
    "molmo_mmmu": "molmo.build_prompt_multiple_choice + split_MMMU",
    # vlmeval/vlm/molmo.py molmo.build_prompt_multiple_choice: "a_okvqa_mc:" prefix, "A: x" lines
    "molmo": "molmo.build_prompt_multiple_choice",
    # vlmeval/vlm/cogvlm.py CogVlm.build_prompt + generate_inner's "\nShort Answer." for MCQ
    "cogvlm": "CogVlm.build_prompt",
}
STYLES = tuple(STYLE_SOURCES)

# text that VLMEvalKit puts at the start of the assistant turn, before generation
ASSISTANT_PREFIX = {
    "idefics2": "Answer:",
    "idefics2_mmbench": "Answer:",
    "idefics2_mmmu": "Answer:",
}

# hub model family -> its default style; the config's hub_vlms.<name>.prompt sets the style per
# benchmark (our own checkpoints are finetuned on LLaVA-Instruct data, so the paper evaluates
# them with LLaVA's wording)
STYLE_BY_FAMILY = {
    "fgvlm": "llava",
    "llava": "llava",
    "llava_next": "llava",
    "llava_interleave": "llava",
    "internvl2": "llava",
    "qwen2_vl": "qwen2_vl",
    "idefics2": "idefics2",
    "idefics3": "idefics2",
    "phi3_vision": "vlmevalkit_default",
    "molmo": "molmo",
    "cogvlm": "cogvlm",
}
# families whose model API takes one image per question (VLMEvalKit's INTERLEAVE = False
# wrappers keep the first: message_to_promptimg); the others may be shown every image
ONE_IMAGE_FAMILIES = frozenset({"fgvlm", "molmo", "cogvlm"})
# VLMEvalKit's split_MMMU cuts a question at "<image k>" (one digit) to place image k there
IMAGE_REFERENCE = re.compile(r"<image \d>")
# hub repo id fragment (lower case) -> family; first match wins, so specific names come first
FAMILY_BY_REPO_FRAGMENT = (
    ("llava-interleave", "llava_interleave"),
    ("llava-v1.6", "llava_next"),
    ("llava-next", "llava_next"),
    ("llava", "llava"),
    ("qwen2-vl", "qwen2_vl"),
    ("idefics3", "idefics3"),
    ("idefics2", "idefics2"),
    ("internvl2", "internvl2"),
    ("phi-3", "phi3_vision"),
    ("molmo", "molmo"),
    ("cogvlm", "cogvlm"),
)


def format_options(options: list[str], *, separator: str = ". ") -> str:
    """Options as lettered lines: ["x", "y"] -> "A. x\\nB. y"."""
    if not options:
        raise ValueError("format_options: no options")
    if len(options) > len(LETTERS):
        raise ValueError(
            f"format_options: {len(options)} options, at most {len(LETTERS)} have letters"
        )
    return "\n".join(f"{LETTERS[i]}{separator}{o}" for i, o in enumerate(options))


def family_of_repo(repo: str) -> str:
    """The model family of a hub repo id ("llava-hf/llava-1.5-7b-hf" -> "llava")."""
    name = repo.lower()
    for fragment, family in FAMILY_BY_REPO_FRAGMENT:
        if fragment in name:
            return family
    raise ValueError(f"no prompt family known for hub repo {repo!r}; set it in the config")


def style_for(family: str) -> str:
    """The default prompt style of a model ``family`` (a key of ``STYLE_BY_FAMILY``)."""
    if family not in STYLE_BY_FAMILY:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(STYLE_BY_FAMILY)}")
    return STYLE_BY_FAMILY[family]


def _joined_at_images(text: str) -> str:
    """split_MMMU then message_to_promptimg: the text parts around "<image k>" joined by "\n"."""
    return "\n".join(IMAGE_REFERENCE.split(text))


def _dataset_prompt(question: str, options: list[str], hint: str | None) -> str:
    """VLMEvalKit's ImageMCQDataset.build_prompt text, trailing " \\n" included."""
    prompt = f"Hint: {hint}\n" if hint else ""
    prompt += f"Question: {question}\n"
    prompt += "Options:\n" + format_options(options) + "\n"
    return prompt + VLMEVALKIT_MCQ_INSTRUCTION + " \n"


def cloze_prompt(question: str, *, hint: str | None = None) -> str:
    """The question alone (after its hint, when it has one): the prompt after which
    ``option_likelihood`` scores each option's text as the answer."""
    hint = hint if hint and hint.strip() else None
    return f"{hint}\n{question}" if hint else question


def mcq_prompt(
    question: str, options: list[str], *, hint: str | None = None, style: str = "llava"
) -> str:
    """The user text of one multiple-choice question in ``style`` (see ``STYLE_SOURCES``).

    In: the question, its options in letter order, an optional hint (MMBench's context).
    Out: the text VLMEvalKit would give that model family, without image tokens.
    """
    hint = hint if hint and hint.strip() else None  # VLMEvalKit drops NaN hints
    if style == "llava":
        head = f"{hint}\n{question}" if hint else question
        return f"{head}\n{format_options(options)}\n{LLAVA_MCQ_INSTRUCTION}"
    if style == "cogvlm":
        head = f"{hint}\n{question}" if hint else question
        return f"{head}\n{format_options(options)}\n{LLAVA_MCQ_INSTRUCTION}\nShort Answer."
    if style in ("molmo", "molmo_mmmu"):
        head = f"{hint}\n{question}" if hint else question
        text = f"a_okvqa_mc: {head}\n{format_options(options, separator=': ')}"
        return _joined_at_images(text) if style == "molmo_mmmu" else text
    if style not in STYLE_SOURCES:
        raise ValueError(f"unknown prompt style {style!r}; valid: {', '.join(STYLES)}")
    prompt = _dataset_prompt(question, options, hint)
    if style == "vlmevalkit_default":
        return prompt
    if style == "vlmevalkit_default_mmmu":
        return _joined_at_images(prompt)
    if style == "idefics2_default":
        return prompt.strip()
    if style == "idefics2_mmmu":
        return _idefics2_mmmu(prompt)
    if style == "qwen2_vl":
        return prompt.rstrip()
    # Idefics2: the dataset text, stripped, "Options:" -> "Choices:", its own instruction
    text = prompt.strip().replace("\nOptions:", "\nChoices:")
    if style == "idefics2":
        return text.replace(VLMEVALKIT_MCQ_INSTRUCTION, "Answer with the letter.")
    text = text.replace(VLMEVALKIT_MCQ_INSTRUCTION, "Answer with a letter.")
    if hint is None:
        return text
    hint_part, rest = text.split("\nQuestion:", 1)
    question_part, choices = rest.split("\nChoices:", 1)
    return f"Question:{question_part}\n{hint_part}\nChoices:{choices}"


def open_prompt(question: str, *, hint: str | None = None, style: str = "llava") -> str:
    """The user text of an open (non-multiple-choice) question, as VLMEvalKit builds MMMU's:
    no options and no letter instruction; LLaVA's wording asks for a direct answer. The reader
    gives such a question the options (gold text, "Other Answers") it is scored against."""
    hint = hint if hint and hint.strip() else None
    if style in ("llava", "cogvlm"):
        head = f"{hint}\n{question}" if hint else question
        return f"{head}\nAnswer the question directly."
    if style not in STYLE_SOURCES:
        raise ValueError(f"unknown prompt style {style!r}; valid: {', '.join(STYLES)}")
    prompt = (f"Hint: {hint}\n" if hint else "") + f"Question: {question}\n"
    if style.endswith("_mmmu"):
        prompt = _joined_at_images(prompt)
    return prompt if style == "vlmevalkit_default" else prompt.strip()


def _idefics2_mmmu(prompt: str) -> str:
    """IDEFICS2.build_prompt_mmmu's text: each part stripped, "Question:" dropped, "Choices:"
    and its instruction, " <image k> " between the parts."""
    parts = []
    for part in IMAGE_REFERENCE.split(prompt):
        part = part.strip().replace("Question:", "")
        part = part.replace(VLMEVALKIT_MCQ_INSTRUCTION, "Answer with the letter.")
        parts.append(part.replace("\nOptions:", "\nChoices:").strip())
    references = [f" {ref} " for ref in IMAGE_REFERENCE.findall(prompt)] + [""]
    return "".join(part + ref for part, ref in zip(parts, references, strict=True))
