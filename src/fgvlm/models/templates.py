"""Chat templates: LLaVA conversations -> token ids and labels, for training and generation;
and the Jinja chat templates of transformers tokenizers and processors (``CHATML_JINJA``,
``LLAVA_CHAT_TEMPLATE``, ``QWEN2_VL_CHAT_TEMPLATE``).

A conversation (LLaVA format) is ``[{"from": "human" | "gpt", "value": str}, ...]``, alternating
human/gpt and starting with human; ``"<image>"`` in a human turn marks where the image goes.
Four templates, token layouts as LLaVA-1.5 and the model families write them (``|`` separates
pieces, ``*`` marks pieces that carry loss; ``<bos>``/``<eos>`` are the tokenizer's own ids):

- ``plain`` (LLaVA pretraining, ``conv_llava_plain``; the human turn is replaced by the image)::

      <bos> | <image> | *caption | *<eos>

  LLaVA ends captions with its ``"\\n"`` separator; we end them with the end token so that a
  captioning model learns to stop.
- ``vicuna_v1`` (LLaVA-1.5's ``conv_vicuna_v1``, ``--version v1``)::

      <bos> | {system} USER: {human} ASSISTANT: | *" {answer}" | *<eos>
      | USER: {human} ASSISTANT: | ...
- ``llama2`` (Llama-2 chat, LLaVA's ``conv_llava_llama_2``)::

      <bos> | [INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{human} [/INST] | *" {answer} " | *<eos>
      | <bos> | [INST] {human} [/INST] | ...
- ``chatml`` (Qwen)::

      <|im_start|> | system\\n{system} | <|im_end|> | \\n
      | <|im_start|> | user\\n{human} | <|im_end|> | \\n | <|im_start|> | assistant\\n
      | *{answer} | *<|im_end|> | \\n | ...

Each piece is tokenized on its own (no special tokens added), so label positions are exact by
construction, and the generation prompt (``prompt_ids``) is exactly the prefix a training sample
has before its first answer. ``<bos>`` is used where the tokenizer defines one (Llama: yes,
Qwen: no). Tokenizers that prepend a space marker to every text they encode (SentencePiece
with a dummy prefix, as Llama-2's) start each piece with it: training and generation share the
pieces, so they agree, but ids may differ slightly from encoding the whole string at once
(LLaVA's ``tokenizer_image_token`` does the same around the image). The image placeholder
becomes the sentinel ``IMAGE_TOKEN_ID``; the VLM splices the image's patch features there.
A tokenizer that lacks a token the template needs, or a
conversation that does not alternate human/gpt, raises ``TemplateMismatchError`` naming the
sample: a sample is never silently masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
IMAGE_TOKEN_ID = -200  # sentinel in input_ids where the image goes (never a vocabulary id)
TEMPLATE_NAMES = ("plain", "vicuna_v1", "llama2", "chatml")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "You are a helpful assistant."
DEFAULT_SYSTEMS = {
    "plain": "",
    "vicuna_v1": VICUNA_SYSTEM,
    "llama2": LLAMA2_SYSTEM,
    "chatml": CHATML_SYSTEM,
}

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
LLAMA2_MARKERS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
# Tokens a freshly trained tokenizer should hold as single tokens for each template. chatml
# requires its two markers to be single tokens; Llama-2's markers are plain text in the real
# Llama-2 tokenizer, so templates.py tokenizes them as text (one token each where the vocabulary
# has them, which keeps tiny models' sequences short).
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "vicuna_v1": (),
    "llama2": LLAMA2_MARKERS,
    "chatml": (IM_START, IM_END),
}
_BOS, _EOS = "<bos>", "<eos>"  # stand-ins resolved to the tokenizer's own bos/eos ids

# Jinja chat templates for transformers tokenizers and processors (``apply_chat_template``).
# Qwen's chatml, with its default system turn: the tiny Qwen2-family tokenizers' template
CHATML_JINJA = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# chatml with the image before the text, as llava-hf's Qwen-based LLaVA models (interleave,
# onevision) format it; the processor expands "<image>" to one token per patch
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2-VL-Instruct's template without its default system turn (tiny vocabularies lack its words)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TemplateMismatchError(ValueError):
    """A conversation cannot be written in a template with this tokenizer."""


@dataclass(frozen=True)
class Piece:
    """One tokenization unit: ``text`` (tokenized on its own, may hold the image placeholder)
    or ``special`` (a token string that must be a single id); ``loss`` when it is a label."""

    text: str = ""
    special: str | None = None
    loss: bool = False


def _text(text: str, loss: bool = False) -> Piece:
    return Piece(text=text, loss=loss)


def _special(token: str, loss: bool = False) -> Piece:
    return Piece(special=token, loss=loss)


def check_template(template: str) -> None:
    """Raise ValueError unless ``template`` is one of ``TEMPLATE_NAMES``."""
    if template not in TEMPLATE_NAMES:
        raise ValueError(f"unknown chat template {template!r}; known: {list(TEMPLATE_NAMES)}")


def conversation_turns(
    conversations: list[dict[str, Any]], *, sample_id: str
) -> list[tuple[str, str]]:
    """Check a LLaVA conversation and pair it into (human, gpt) turns.

    Raises ``TemplateMismatchError`` naming ``sample_id`` when it is empty, a role is not
    human/gpt, roles do not alternate starting with human, it ends without an answer, a value is
    not a string, or a gpt turn holds the image placeholder.
    """
    if not isinstance(conversations, list) or not conversations:
        raise TemplateMismatchError(f"sample {sample_id!r}: empty or missing conversations")
    roles = [turn.get("from") if isinstance(turn, dict) else None for turn in conversations]
    expected = ["human", "gpt"] * (len(conversations) // 2 + 1)
    if roles != expected[: len(roles)] or len(roles) % 2:
        raise TemplateMismatchError(
            f"sample {sample_id!r}: conversation roles {roles} do not alternate human/gpt "
            f"(starting with human, ending with gpt)"
        )
    values = [turn.get("value") for turn in conversations]
    if not all(isinstance(value, str) for value in values):
        raise TemplateMismatchError(f"sample {sample_id!r}: every turn needs a string 'value'")
    turns = list(zip(values[0::2], values[1::2], strict=True))
    if any(IMAGE_PLACEHOLDER in answer for _, answer in turns):
        raise TemplateMismatchError(
            f"sample {sample_id!r}: {IMAGE_PLACEHOLDER!r} in an answer (gpt turn)"
        )
    return turns


def _plain(turns: list[tuple[str, str | None]], system: str, sample_id: str) -> list[Piece]:
    if len(turns) != 1 or IMAGE_PLACEHOLDER not in turns[0][0]:
        raise TemplateMismatchError(
            f"sample {sample_id!r}: the plain template needs one human turn holding "
            f"{IMAGE_PLACEHOLDER!r} and one caption, got {len(turns)} turn(s)"
        )
    # LLaVA's preprocess_plain keeps only the image of the human turn
    pieces = [_special(_BOS), _text(IMAGE_PLACEHOLDER)]
    answer = turns[0][1]
    if answer is not None:
        pieces += [_text(answer, loss=True), _special(_EOS, loss=True)]
    return pieces


def _vicuna_v1(turns: list[tuple[str, str | None]], system: str, sample_id: str) -> list[Piece]:
    pieces = [_special(_BOS)]
    for i, (human, answer) in enumerate(turns):
        prefix = f"{system} " if i == 0 and system else ""
        pieces.append(_text(f"{prefix}USER: {human} ASSISTANT:"))
        if answer is not None:
            pieces += [_text(f" {answer}", loss=True), _special(_EOS, loss=True)]
    return pieces


def _llama2(turns: list[tuple[str, str | None]], system: str, sample_id: str) -> list[Piece]:
    pieces: list[Piece] = []
    for i, (human, answer) in enumerate(turns):
        sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 and system else ""
        pieces += [_special(_BOS), _text(f"[INST] {sys_block}{human} [/INST]")]
        if answer is not None:
            pieces += [_text(f" {answer} ", loss=True), _special(_EOS, loss=True)]
    return pieces


def _chatml(turns: list[tuple[str, str | None]], system: str, sample_id: str) -> list[Piece]:
    pieces: list[Piece] = []
    if system:
        pieces += [_special(IM_START), _text(f"system\n{system}"), _special(IM_END), _text("\n")]
    for human, answer in turns:
        pieces += [_special(IM_START), _text(f"user\n{human}"), _special(IM_END), _text("\n")]
        pieces += [_special(IM_START), _text("assistant\n")]
        if answer is not None:
            pieces += [_text(answer, loss=True), _special(IM_END, loss=True), _text("\n")]
    return pieces


_BUILDERS = {"plain": _plain, "vicuna_v1": _vicuna_v1, "llama2": _llama2, "chatml": _chatml}


def template_pieces(
    template: str,
    turns: list[tuple[str, str | None]],
    *,
    system: str | None = None,
    sample_id: str = "",
) -> list[Piece]:
    """The template's pieces for (human, answer) turns; answer None only in the last turn
    (the generation prompt: it ends with the assistant header)."""
    check_template(template)
    if any(answer is None for _, answer in turns[:-1]):
        raise ValueError(f"sample {sample_id!r}: only the last turn may lack its answer")
    system = DEFAULT_SYSTEMS[template] if system is None else system
    return _BUILDERS[template](turns, system, sample_id)


def render_conversation(
    template: str,
    conversations: list[dict[str, Any]],
    *,
    bos: str | None,
    eos: str | None,
    system: str | None = None,
    sample_id: str = "",
) -> str:
    """The template's text of a conversation, special tokens written out (``bos`` None: none).

    For training tokenizers and for reading; training itself goes through
    ``tokenize_conversation``.
    """
    turns: list[tuple[str, str | None]] = list(
        conversation_turns(conversations, sample_id=sample_id)
    )
    names = {_BOS: bos or "", _EOS: eos or ""}
    pieces = template_pieces(template, turns, system=system, sample_id=sample_id)
    return "".join(p.text if p.special is None else names.get(p.special, p.special) for p in pieces)


def _special_id(tokenizer: Any, token: str, sample_id: str, template: str) -> int | None:
    """The id of a special piece; None for an absent optional bos; error if required and absent."""
    if token == _BOS:
        return tokenizer.bos_token_id
    if token == _EOS:
        if tokenizer.eos_token_id is None:
            raise TemplateMismatchError(
                f"sample {sample_id!r}: template {template!r} needs an end-of-sequence token "
                f"but the tokenizer defines none"
            )
        return tokenizer.eos_token_id
    token_id = tokenizer.convert_tokens_to_ids(token)
    unk = tokenizer.unk_token_id
    if token_id is None or (unk is not None and token_id == unk and token != tokenizer.unk_token):
        raise TemplateMismatchError(
            f"sample {sample_id!r}: template {template!r} needs the token {token!r}, "
            f"which the tokenizer lacks"
        )
    return int(token_id)


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a text piece; each image placeholder becomes ``IMAGE_TOKEN_ID``."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids.append(IMAGE_TOKEN_ID)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
    return ids


def encode_pieces(
    template: str, tokenizer: Any, pieces: list[Piece], *, sample_id: str
) -> tuple[list[int], list[int]]:
    """Tokenize pieces one by one -> (input_ids, labels); labels are the ids of loss pieces
    and ``IGNORE_INDEX`` elsewhere."""
    input_ids: list[int] = []
    labels: list[int] = []
    for piece in pieces:
        if piece.special is not None:
            token_id = _special_id(tokenizer, piece.special, sample_id, template)
            ids = [] if token_id is None else [token_id]
        else:
            ids = _encode_text(tokenizer, piece.text)
        input_ids.extend(ids)
        labels.extend(ids if piece.loss else [IGNORE_INDEX] * len(ids))
    return input_ids, labels


def _truncate(
    input_ids: list[int], labels: list[int], max_length: int, sample_id: str
) -> tuple[list[int], list[int]]:
    """Cut to ``max_length`` tokens; error when that drops the image or every label."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if len(input_ids) <= max_length:
        return input_ids, labels
    if IMAGE_TOKEN_ID in input_ids[max_length:]:
        raise ValueError(
            f"sample {sample_id!r}: truncating {len(input_ids)} tokens to max_length="
            f"{max_length} would cut the image placeholder"
        )
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(
            f"sample {sample_id!r}: truncating to max_length={max_length} leaves no answer token"
        )
    return input_ids, labels


def tokenize_conversation(
    template: str,
    tokenizer: Any,
    conversations: list[dict[str, Any]],
    *,
    sample_id: str,
    max_length: int | None = None,
    system: str | None = None,
) -> tuple[list[int], list[int]]:
    """A LLaVA conversation -> (input_ids, labels) of equal length.

    ``input_ids`` holds ``IMAGE_TOKEN_ID`` where ``"<image>"`` was; ``labels`` holds the ids of
    the assistant answers and their end token, ``IGNORE_INDEX`` elsewhere. ``max_length`` cuts
    the end (error if the image or every label would be cut). ``system`` overrides the
    template's default system prompt ("" for none). Raises ``TemplateMismatchError`` naming
    ``sample_id`` for bad conversations or a tokenizer lacking a needed token.
    """
    turns: list[tuple[str, str | None]] = list(
        conversation_turns(conversations, sample_id=sample_id)
    )
    pieces = template_pieces(template, turns, system=system, sample_id=sample_id)
    input_ids, labels = encode_pieces(template, tokenizer, pieces, sample_id=sample_id)
    if max_length is not None:
        input_ids, labels = _truncate(input_ids, labels, max_length, sample_id)
    return input_ids, labels


def prompt_ids(
    template: str, tokenizer: Any, user_text: str, *, system: str | None = None
) -> list[int]:
    """The generation prompt: one user turn, then the assistant header (``IMAGE_TOKEN_ID`` for
    ``"<image>"``). Equal to a training sample's ids before its first answer."""
    pieces = template_pieces(template, [(user_text, None)], system=system, sample_id="prompt")
    return encode_pieces(template, tokenizer, pieces, sample_id="prompt")[0]


def answer_ids(template: str, tokenizer: Any, answer: str) -> list[int]:
    """The ids an answer carries as labels after a prompt (its text piece and end token), e.g.
    to score answer options by likelihood after ``prompt_ids``."""
    conversation = [
        {"from": "human", "value": IMAGE_PLACEHOLDER},
        {"from": "gpt", "value": answer},
    ]
    _, labels = tokenize_conversation(template, tokenizer, conversation, sample_id="answer")
    return [label for label in labels if label != IGNORE_INDEX]


def stop_token_ids(template: str, tokenizer: Any) -> list[int]:
    """Ids that end an assistant answer in ``template`` (generation stops there)."""
    check_template(template)
    token = IM_END if template == "chatml" else _EOS
    token_id = _special_id(tokenizer, token, "generation", template)
    return [] if token_id is None else [token_id]
