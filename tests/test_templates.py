"""Chat templates: exact token layouts and loss positions, generation prompts, mismatch errors."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fgvlm.models.templates import (
    CHATML_SYSTEM,
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    LLAMA2_SYSTEM,
    TEMPLATE_NAMES,
    VICUNA_SYSTEM,
    TemplateMismatchError,
    answer_ids,
    prompt_ids,
    render_conversation,
    stop_token_ids,
    tokenize_conversation,
)

SPECIALS = ["<s>", "</s>", "<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat is it?"},
    {"from": "gpt", "value": "It is a red circle."},
    {"from": "human", "value": "What colour is it?"},
    {"from": "gpt", "value": "It is red."},
]
CAPTION = [
    {"from": "human", "value": "<image>"},
    {"from": "gpt", "value": "a red circle on grey"},
]
# the exact text of every span that carries loss, and of the whole sequence (image as <image>)
EXPECTED = {
    "plain": (
        CAPTION,
        ["a red circle on grey</s>"],
        "<s><image>a red circle on grey</s>",
    ),
    "vicuna_v1": (
        TWO_TURNS,
        [" It is a red circle.</s>", " It is red.</s>"],
        f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: It is a red circle.</s>"
        "USER: What colour is it? ASSISTANT: It is red.</s>",
    ),
    "llama2": (
        TWO_TURNS,
        [" It is a red circle. </s>", " It is red. </s>"],
        f"<s>[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat is it? [/INST] "
        "It is a red circle. </s><s>[INST] What colour is it? [/INST] It is red. </s>",
    ),
    "chatml": (
        TWO_TURNS,
        ["It is a red circle.<|im_end|>", "It is red.<|im_end|>"],
        f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?"
        "<|im_end|>\n<|im_start|>assistant\nIt is a red circle.<|im_end|>\n<|im_start|>user\n"
        "What colour is it?<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>\n",
    ),
}


def word_tokenizer(specials=SPECIALS, *, bos: str | None = "<s>", eos: str | None = "</s>"):
    """A word-level tokenizer with byte-level pre-tokenization (exact decoding) over the words
    of the test texts: one id per word, as a tiny model's vocabulary."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # the texts between special tokens and images, as the templates tokenize them
    chunks = [text for _, _, text in EXPECTED.values()]
    for marker in [*SPECIALS, "<image>"]:
        chunks = [part for chunk in chunks for part in chunk.split(marker)]
    words = sorted({w for chunk in chunks for w, _ in pre.pre_tokenize_str(chunk)})
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="<unk>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def decode_with_image(tokenizer, ids: list[int]) -> str:
    """Decode ids, writing IMAGE_TOKEN_ID back as <image>."""
    text, chunk = [], []
    for token_id in [*ids, None]:
        if token_id is None or token_id == IMAGE_TOKEN_ID:
            text.append(tokenizer.decode(chunk))
            chunk = []
            if token_id is not None:
                text.append("<image>")
        else:
            chunk.append(token_id)
    return "".join(text)


def labelled_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of positions that carry loss, as their ids."""
    spans: list[list[int]] = []
    previous = False
    for token_id, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token_id  # a label is always the token at its own position
            if not previous:
                spans.append([])
            spans[-1].append(label)
        previous = label != IGNORE_INDEX
    return spans


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_loss_positions_token_by_token(tokenizer, template):
    conversation, expected_spans, expected_text = EXPECTED[template]
    input_ids, labels = tokenize_conversation(template, tokenizer, conversation, sample_id="s1")
    assert len(input_ids) == len(labels)
    assert input_ids.count(IMAGE_TOKEN_ID) == 1
    assert labels[input_ids.index(IMAGE_TOKEN_ID)] == IGNORE_INDEX
    assert decode_with_image(tokenizer, input_ids) == expected_text
    spans = labelled_spans(input_ids, labels)
    assert [tokenizer.decode(span) for span in spans] == expected_spans
    # every labelled span ends with the template's end token
    stop = stop_token_ids(template, tokenizer)
    assert all(span[-1] in stop for span in spans)
    # the text the tokenizer would be trained on is the same layout
    rendered = render_conversation(template, conversation, bos="<s>", eos="</s>")
    assert rendered == expected_text


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_prompt_is_the_training_prefix_and_answer_ids_the_label(tokenizer, template):
    conversation = EXPECTED[template][0][:2]
    input_ids, labels = tokenize_conversation(template, tokenizer, conversation, sample_id="s")
    first_label = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    prompt = prompt_ids(template, tokenizer, conversation[0]["value"])
    assert prompt == input_ids[:first_label]
    assert (
        answer_ids(template, tokenizer, conversation[1]["value"])
        == input_ids[first_label:][: len(labelled_spans(input_ids, labels)[0])]
    )


def test_system_override_and_no_bos_tokenizer():
    tokenizer = word_tokenizer(bos=None)
    ids, _ = tokenize_conversation("vicuna_v1", tokenizer, TWO_TURNS[:2], sample_id="q", system="")
    # no bos for a Qwen-like tokenizer, and an empty system prompt drops the system text
    assert tokenizer.decode(ids[:3]) == "USER: "
    ids, _ = tokenize_conversation("chatml", tokenizer, TWO_TURNS[:2], sample_id="q", system="")
    assert decode_with_image(tokenizer, ids).startswith("<|im_start|>user\n<image>")


def test_chatml_needs_its_markers():
    tokenizer = word_tokenizer(["<s>", "</s>", "<unk>", "<pad>"])
    with pytest.raises(TemplateMismatchError, match="sample-7.*<\\|im_start\\|>"):
        tokenize_conversation("chatml", tokenizer, TWO_TURNS, sample_id="sample-7")
    # the other templates do not need them
    tokenize_conversation("vicuna_v1", tokenizer, TWO_TURNS, sample_id="sample-7")


def test_missing_eos_is_a_mismatch():
    tokenizer = word_tokenizer(eos=None)
    for template in ("plain", "vicuna_v1", "llama2"):
        conversation = EXPECTED[template][0]
        with pytest.raises(TemplateMismatchError, match="'no-eos'.*end-of-sequence"):
            tokenize_conversation(template, tokenizer, conversation, sample_id="no-eos")


@pytest.mark.parametrize(
    "conversation",
    [
        [],
        [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "hello"}],
        [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
        [{"from": "human", "value": "a"}],
        [
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
            {"from": "human", "value": "c"},
        ],
        [{"from": "system", "value": "a"}, {"from": "gpt", "value": "b"}],
        [{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image> b"}],
        [{"from": "human", "value": "a"}, {"from": "gpt", "value": None}],
    ],
)
def test_bad_conversations_raise_naming_the_sample(tokenizer, conversation):
    for template in TEMPLATE_NAMES:
        with pytest.raises(TemplateMismatchError, match="bad-42"):
            tokenize_conversation(template, tokenizer, conversation, sample_id="bad-42")


def test_plain_needs_one_image_turn(tokenizer):
    with pytest.raises(TemplateMismatchError, match="cap-1"):
        tokenize_conversation("plain", tokenizer, TWO_TURNS, sample_id="cap-1")
    text_only = [{"from": "human", "value": "no image"}, {"from": "gpt", "value": "red"}]
    with pytest.raises(TemplateMismatchError, match="cap-2"):
        tokenize_conversation("plain", tokenizer, text_only, sample_id="cap-2")


def test_truncation_keeps_labels_aligned(tokenizer):
    full_ids, full_labels = tokenize_conversation("vicuna_v1", tokenizer, TWO_TURNS, sample_id="t")
    cut = len(full_ids) - 3
    ids, labels = tokenize_conversation(
        "vicuna_v1", tokenizer, TWO_TURNS, sample_id="t", max_length=cut
    )
    assert ids == full_ids[:cut] and labels == full_labels[:cut]
    image_at = full_ids.index(IMAGE_TOKEN_ID)
    with pytest.raises(ValueError, match="'t'.*image placeholder"):
        tokenize_conversation("vicuna_v1", tokenizer, TWO_TURNS, sample_id="t", max_length=image_at)
    first_label = next(i for i, label in enumerate(full_labels) if label != IGNORE_INDEX)
    with pytest.raises(ValueError, match="'t'.*no answer token"):
        tokenize_conversation(
            "vicuna_v1", tokenizer, TWO_TURNS, sample_id="t", max_length=first_label
        )


def test_text_only_sample_has_no_image_token(tokenizer):
    conversation = [
        {"from": "human", "value": "What is it?"},
        {"from": "gpt", "value": "It is red."},
    ]
    ids, labels = tokenize_conversation("chatml", tokenizer, conversation, sample_id="txt")
    assert IMAGE_TOKEN_ID not in ids
    assert [tokenizer.decode(s) for s in labelled_spans(ids, labels)] == ["It is red.<|im_end|>"]


def test_unknown_template(tokenizer):
    with pytest.raises(ValueError, match="unknown chat template 'alpaca'"):
        tokenize_conversation("alpaca", tokenizer, TWO_TURNS, sample_id="x")
