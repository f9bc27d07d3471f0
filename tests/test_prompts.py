"""Multiple-choice prompts: the paper's question and options, in each family's VLMEvalKit wording."""

from __future__ import annotations

from pathlib import Path

import pytest

from fgvlm.evaluate.prompts import (
    STYLE_BY_FAMILY,
    STYLES,
    family_of_repo,
    format_options,
    mcq_prompt,
    style_for,
)
from fgvlm.mcq import FINE_GRAINED_QUESTION

OPTIONS = ["tulip", "rose", "daisy", "sunflower", "orchid"]
LINES = "A. tulip\nB. rose\nC. daisy\nD. sunflower\nE. orchid"
Q = FINE_GRAINED_QUESTION


def test_question_and_options_format():
    assert FINE_GRAINED_QUESTION == "What type of object is in this photo?"
    assert format_options(OPTIONS) == LINES
    assert format_options(["x", "y"], separator=": ") == "A: x\nB: y"
    with pytest.raises(ValueError, match="no options"):
        format_options([])
    with pytest.raises(ValueError, match="27 options"):
        format_options([str(i) for i in range(27)])


# the exact strings VLMEvalKit's build_prompt functions produce (sources in prompts.STYLE_SOURCES)
EXPECTED = {
    "llava": (
        f"{Q}\n{LINES}\nAnswer with the option's letter from the given choices directly.",
        f"Look closely.\n{Q}\n{LINES}\n"
        "Answer with the option's letter from the given choices directly.",
    ),
    "vlmevalkit_default": (
        f"Question: {Q}\nOptions:\n{LINES}\n"
        "Please select the correct answer from the options above. \n",
        f"Hint: Look closely.\nQuestion: {Q}\nOptions:\n{LINES}\n"
        "Please select the correct answer from the options above. \n",
    ),
    "qwen2_vl": (
        f"Question: {Q}\nOptions:\n{LINES}\nPlease select the correct answer from the options above.",
        f"Hint: Look closely.\nQuestion: {Q}\nOptions:\n{LINES}\n"
        "Please select the correct answer from the options above.",
    ),
    "idefics2": (
        f"Question: {Q}\nChoices:\n{LINES}\nAnswer with the letter.",
        f"Hint: Look closely.\nQuestion: {Q}\nChoices:\n{LINES}\nAnswer with the letter.",
    ),
    "idefics2_mmbench": (
        f"Question: {Q}\nChoices:\n{LINES}\nAnswer with a letter.",
        f"Question: {Q}\nHint: Look closely.\nChoices:\n{LINES}\nAnswer with a letter.",
    ),
    "molmo": (
        f"a_okvqa_mc: {Q}\nA: tulip\nB: rose\nC: daisy\nD: sunflower\nE: orchid",
        f"a_okvqa_mc: Look closely.\n{Q}\nA: tulip\nB: rose\nC: daisy\nD: sunflower\nE: orchid",
    ),
    "cogvlm": (
        f"{Q}\n{LINES}\nAnswer with the option's letter from the given choices directly.\n"
        "Short Answer.",
        f"Look closely.\n{Q}\n{LINES}\n"
        "Answer with the option's letter from the given choices directly.\nShort Answer.",
    ),
}


@pytest.mark.parametrize("style", STYLES)
def test_every_style_matches_vlmevalkit(style):
    without_hint, with_hint = EXPECTED[style]
    assert mcq_prompt(Q, OPTIONS, style=style) == without_hint
    assert mcq_prompt(Q, OPTIONS, hint="Look closely.", style=style) == with_hint
    # an empty or blank hint is no hint (VLMEvalKit drops NaN hints)
    assert mcq_prompt(Q, OPTIONS, hint="", style=style) == without_hint
    assert mcq_prompt(Q, OPTIONS, hint="  ", style=style) == without_hint


def test_default_style_is_llava_and_unknown_style_fails():
    assert mcq_prompt(Q, OPTIONS) == EXPECTED["llava"][0]
    with pytest.raises(ValueError, match="unknown prompt style 'gpt4'"):
        mcq_prompt(Q, OPTIONS, style="gpt4")


def test_families_map_to_known_styles():
    assert set(STYLE_BY_FAMILY.values()) <= set(STYLES)
    assert style_for("llava") == "llava"
    assert style_for("fgvlm") == "llava"  # our own checkpoints: LLaVA evaluation code
    assert style_for("idefics2") == "idefics2"
    assert style_for("idefics2", "mmbench") == "idefics2_mmbench"
    assert style_for("qwen2_vl", "mmbench") == "qwen2_vl"
    with pytest.raises(ValueError, match="unknown model family 'gpt4'"):
        style_for("gpt4")


@pytest.mark.parametrize(
    ("repo", "family"),
    [
        ("llava-hf/llava-1.5-7b-hf", "llava"),
        ("llava-hf/llava-v1.6-vicuna-13b-hf", "llava_next"),
        ("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next"),
        ("llava-hf/llava-interleave-qwen-7b-hf", "llava_interleave"),
        ("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl"),
        ("HuggingFaceM4/idefics2-8b", "idefics2"),
        ("HuggingFaceM4/Idefics3-8B-Llama3", "idefics3"),
        ("OpenGVLab/InternVL2-8B", "internvl2"),
        ("microsoft/Phi-3.5-vision-instruct", "phi3_vision"),
        ("microsoft/Phi-3-vision-128k-instruct", "phi3_vision"),
        ("allenai/Molmo-7B-D-0924", "molmo"),
        ("THUDM/cogvlm-chat-hf", "cogvlm"),
    ],
)
def test_family_of_every_paper_hub_repo(repo, family):
    assert family_of_repo(repo) == family


def test_unknown_repo_is_an_error():
    with pytest.raises(ValueError, match="acme/vision-9b"):
        family_of_repo("acme/vision-9b")


def test_every_hub_vlm_of_the_paper_config_has_a_family():
    import yaml

    config_path = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
    hub = yaml.safe_load(config_path.read_text())["hub_vlms"]
    assert len(hub) == 15
    for name, entry in hub.items():
        assert style_for(family_of_repo(entry["repo"])) in STYLES, name
