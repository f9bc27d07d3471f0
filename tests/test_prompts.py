"""Multiple-choice prompts: the paper's question and options, in each family's VLMEvalKit wording."""

from __future__ import annotations

from pathlib import Path

import pytest

from fgvlm.evaluate.prompts import (
    ASSISTANT_PREFIX,
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
    "idefics2_default": (
        f"Question: {Q}\nOptions:\n{LINES}\nPlease select the correct answer from the options above.",
        f"Hint: Look closely.\nQuestion: {Q}\nOptions:\n{LINES}\n"
        "Please select the correct answer from the options above.",
    ),
    # build_prompt_mmmu drops "Question:" as text, whitespace after it included only at the start
    "idefics2_mmmu": (
        f"{Q}\nChoices:\n{LINES}\nAnswer with the letter.",
        f"Hint: Look closely.\n {Q}\nChoices:\n{LINES}\nAnswer with the letter.",
    ),
    # without an "<image k>" in the question, the MMMU variants are the plain styles
    "vlmevalkit_default_mmmu": (
        f"Question: {Q}\nOptions:\n{LINES}\n"
        "Please select the correct answer from the options above. \n",
        f"Hint: Look closely.\nQuestion: {Q}\nOptions:\n{LINES}\n"
        "Please select the correct answer from the options above. \n",
    ),
    "molmo_mmmu": (
        f"a_okvqa_mc: {Q}\nA: tulip\nB: rose\nC: daisy\nD: sunflower\nE: orchid",
        f"a_okvqa_mc: Look closely.\n{Q}\nA: tulip\nB: rose\nC: daisy\nD: sunflower\nE: orchid",
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


# --- the paper config against VLMEvalKit, model by model (tests/data/vlmevalkit_protocol.yaml) ---

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def protocol():
    import yaml

    return yaml.safe_load((ROOT / "tests" / "data" / "vlmevalkit_protocol.yaml").read_text())


@pytest.fixture(scope="module")
def paper():
    from fgvlm.config import load_config

    return load_config(ROOT / "config" / "config.yaml")


# the framing VLMEvalKit (or the model's own template) puts around the user text; ours is the
# runner's chat template, so the fixture's strings are compared without it
FRAMES = (
    ("User:<image>", "<end_of_utterance>\nAssistant:"),
    ("User: Question: <image 1>:<image>\n", "<end_of_utterance>\nAssistant: Answer:"),
    ("<image>\n", ""),
    ("<|image_1|>\n + ", ""),
    ("<|image_1|>\n", ""),
)


def expected_text(protocol: dict, entry: dict, kind: str) -> str:
    """The user text the fixture records for ``kind`` (fine_grained or mmmu)."""
    prompts = entry["prompts"]
    keys = [f"{kind}_{s}" for s in ("user_text", "text_late", "query", "content", "full")]
    text = next(prompts[k] for k in keys if k in prompts)
    for head, tail in FRAMES:
        if text.startswith(head) and text.endswith(tail):
            text = text[len(head) : len(text) - len(tail) or None]
            break
    # a reference to a shared text, possibly followed by a note in parentheses
    named = [key for key in protocol["texts"] if text.split(" (")[0].strip() == key]
    return protocol["texts"][named[0]] if named else text


@pytest.mark.parametrize(
    "name",
    [
        "llava15_7b",
        "llava15_13b",
        "llava_next_vicuna_7b",
        "llava_next_vicuna_13b",
        "llava_next_mistral_7b",
        "llava_interleave_qwen_7b",
        "qwen2_vl_7b_instruct",
        "idefics2_8b",
        "idefics3_8b",
        "internvl2_8b",
        "phi35_vision",
        "phi3_vision",
        "molmo_7b_d",
        "molmo_7b_o",
        "cogvlm_chat",
    ],
)
def test_each_released_vlm_is_prompted_as_vlmevalkit_prompts_it(protocol, paper, name):
    """For one fine-grained and one MMMU question: the user text our runner gets, the system
    turn, processor/image settings and max_new_tokens, against the fixture's."""
    from fgvlm.config import vlm_eval_spec
    from fgvlm.evaluate.scoring import question_items

    entry = protocol["models"][name]
    for kind, benchmark in (("fine_grained", "flowers"), ("mmmu", "mmmu")):
        example = protocol["examples"][kind]
        model = vlm_eval_spec(paper, f"hub-{name}", benchmark)["model"]
        record = {"qid": "q", "question": example["question"], "options": example["options"]}
        # the items evaluation scores (fgvlm.evaluate.run: question_items with the spec's style)
        (item,) = question_items([(record, None)], style=model["style"])
        assert item.prompt == expected_text(protocol, entry, kind), (name, kind)
    fine = vlm_eval_spec(paper, f"hub-{name}", "flowers")["model"]
    mmmu = vlm_eval_spec(paper, f"hub-{name}", "mmmu")["model"]
    system = entry["system_prompt"]
    if isinstance(system, str) and system.startswith("A chat"):
        assert fine["system_prompt"] == system.strip()  # the template adds the separator
    else:
        assert fine["system_prompt"] is None  # the model's own template default
    kwargs = entry["kwargs"]
    expected_processor = {k: v for k, v in kwargs.items() if k in ("min_pixels", "max_pixels")}
    if "processor_num_crops" in kwargs:
        expected_processor["num_crops"] = kwargs["processor_num_crops"]
    assert fine.get("processor_kwargs", {}) == expected_processor
    image = fine.get("image", {})
    assert image.get("pad_to_square", False) == ("expand2square" in entry["preprocessing"])
    assert image.get("max_crops") == (36 if "max_crops: 36" in entry["preprocessing"] else None)
    if "max_num per dataset" in entry["preprocessing"]:  # InternVL2: 6 tiles, 12 on MMMU
        assert (image["tiles"], mmmu["image"]["tiles"]) == (6, 12)
        assert ("upscale" not in image, mmmu["image"]["upscale"]) == (True, 2)
    else:
        assert "tiles" not in image
    # every image of a multi-image question for the models VLMEvalKit shows them all; the
    # fine-grained questions have one, so their evaluations do not depend on the setting
    assert mmmu.get("all_images", False) == entry["images"].startswith("all"), name
    assert "all_images" not in fine and "all_images" not in image
    generation = entry["generation"]
    expected_new = generation.get("max_new_tokens", generation.get("max_length"))
    assert fine["max_new_tokens"] == mmmu["max_new_tokens"] == expected_new
    prefix = ASSISTANT_PREFIX.get(fine["style"], "")
    assert prefix == (
        "Answer:" if entry["prompts"].get("fine_grained_full", "").endswith("Answer:") else ""
    )


def test_prompt_styles_are_config_not_code(paper):
    """A benchmark-specific style comes from hub_vlms.<name>.prompt; without one, the family's."""
    import copy

    from fgvlm.config import vlm_eval_spec

    assert (
        vlm_eval_spec(paper, "hub-idefics2_8b", "mmbench")["model"]["style"] == "idefics2_mmbench"
    )
    assert vlm_eval_spec(paper, "hub-idefics2_8b", "mmstar")["model"]["style"] == "idefics2"
    changed = copy.deepcopy(paper)
    del changed["hub_vlms"]["idefics2_8b"]["prompt"]
    assert vlm_eval_spec(changed, "hub-idefics2_8b", "mmbench")["model"]["style"] == "idefics2"
    # our own checkpoints, the Qwen2-VL base finetuned on LLaVA data included: LLaVA's wording
    for row in ("clip_vicuna_llavapt", "qwen2vl_base_ft_llava"):
        assert vlm_eval_spec(paper, row, "flowers")["model"]["style"] == "llava"


def test_open_questions_are_asked_without_their_scoring_options():
    """An MMMU open question is scored against (gold text, "Other Answers"), which the model
    must not see: the prompt has no options and no letter instruction."""
    from fgvlm.evaluate.scoring import question_items

    record = {
        "qid": "mmmu-7",
        "question": "What is the value of x?",
        "options": ["42", "Other Answers"],
        "open": True,
    }
    for style in ("llava", "qwen2_vl", "vlmevalkit_default", "idefics2_mmmu", "molmo"):
        (item,) = question_items([(record, None)], style=style)
        assert "42" not in item.prompt and "Other Answers" not in item.prompt, style
        assert "What is the value of x?" in item.prompt
        assert "letter" not in item.prompt and "select the correct answer" not in item.prompt
        assert item.options == ["42", "Other Answers"]
    (item,) = question_items([(record, None)], style="llava")
    assert item.prompt == "What is the value of x?\nAnswer the question directly."
