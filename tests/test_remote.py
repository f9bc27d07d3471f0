"""Remote-code VLM adapters on fabricated model folders in the real remote-code format.

Each fake folder holds a config.json whose ``auto_map`` points at Python files written into the
folder (modeling, conversation/processing code), a tokenizer and safetensors weights, so
``from_pretrained(folder, trust_remote_code=True)`` takes the real loading path. The fake
models expose the methods and signatures the adapters call on the released models (InternVL2's
``generate``/``forward``/``conv_template``, Phi-3-vision's processor and ``generate``, Molmo's
``processor.process`` and ``generate_from_batch``, CogVLM's ``build_conversation_input_ids``),
on a tiny Llama language model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from fgvlm.evaluate import remote_runners
from fgvlm.evaluate.remote_runners import load_remote_vlm
from fgvlm.evaluate.runners import load_runner
from fgvlm.mcq import MCQItem
from fgvlm.models.remote import FAMILIES

SPECIAL = [
    "<unk>",
    "<pad>",
    "<s>",
    "</s>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<|im_start|>",
    "<|im_end|>",
    "<|user|>",
    "<|end|>",
    "<|assistant|>",
    "<|endoftext|>",
    "<|image_1|>",
    "<im_start>",
    "<im_patch>",
    "<im_end>",
]
WORDS = (
    "what type of object is in this photo ? A B C D E . : answer with the option 's letter from "
    "given choices directly system user assistant you are a helpful question short red blue "
    "green square circle triangle small large a_okvqa_mc User Assistant Question Answer"
).split()
OPTIONS = ["red square", "blue circle", "green triangle", "small red circle", "large blue square"]
PROMPT = (
    "what type of object is in this photo ?\nA. red square\nB. blue circle\nanswer with a letter"
)
TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
PHI3_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# --- fake remote code (written into the model folders) ------------------------------------------

CORE = """
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel


class FakeConfigBase(PretrainedConfig):
    def __init__(self, llm_config=None, **kwargs):
        self.llm_config = dict(llm_config or {})
        super().__init__(**kwargs)


class FakeBase(PreTrainedModel):
    base_model_prefix = "fake"

    def __init__(self, config):
        super().__init__(config)
        self.language_model = LlamaForCausalLM(LlamaConfig(**config.llm_config))
        self.visual = nn.Linear(3, config.llm_config["hidden_size"])
        self.post_init()

    def _init_weights(self, module):
        pass  # the submodules initialise themselves; loading overwrites everything

    def features(self, pixels, tokens):
        side = int(tokens ** 0.5)
        pooled = nn.functional.adaptive_avg_pool2d(pixels.float(), (side, side))
        feats = self.visual(pooled.flatten(2).transpose(1, 2).to(self.visual.weight.dtype))
        return 4.0 * feats

    def embed(self, input_ids):
        return self.language_model.get_input_embeddings()(input_ids.clamp(min=0)).clone()
"""

INTERNVL_CONVERSATION = """
import dataclasses


@dataclasses.dataclass
class Conversation:
    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: tuple = ("USER", "ASSISTANT")
    messages: list = dataclasses.field(default_factory=list)
    sep: str = "\\n"

    def append_message(self, role, message):
        self.messages.append([role, message])

    def get_prompt(self):
        text = self.system_template.format(system_message=self.system_message) + self.sep
        for role, message in self.messages:
            text += role + message + self.sep if message else role
        return text


def get_conv_template(name):
    return Conversation(
        name=name,
        system_template="<|im_start|>system\\n{system_message}",
        system_message="you are a helpful assistant",
        roles=("<|im_start|>user\\n", "<|im_start|>assistant\\n"),
        sep="<|im_end|>",
    )
"""

INTERNVL_MODELING = (
    CORE
    + """
from .conversation import get_conv_template


class InternVLChatConfig(FakeConfigBase):
    model_type = "fake_internvl_chat"

    def __init__(self, template="internlm2-chat", force_image_size=28, vision_config=None,
                 downsample_ratio=0.5, **kwargs):
        self.template = template
        self.force_image_size = force_image_size
        self.vision_config = vision_config or {"image_size": 28, "patch_size": 7}
        self.downsample_ratio = downsample_ratio
        super().__init__(**kwargs)


class InternVLChatModel(FakeBase):
    config_class = InternVLChatConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        size = config.force_image_size or config.vision_config["image_size"]
        patch = config.vision_config["patch_size"]
        self.num_image_token = int((size // patch) ** 2 * (config.downsample_ratio ** 2))
        self.template = config.template
        self.conv_template = get_conv_template(self.template)
        self.system_message = self.conv_template.system_message
        self.img_context_token_id = None

    def extract_feature(self, pixel_values):
        return self.features(pixel_values, self.num_image_token)

    def _splice(self, input_ids, vit_embeds):
        embeds = self.embed(input_ids)
        selected = input_ids == self.img_context_token_id
        embeds[selected] = vit_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(self, pixel_values, input_ids=None, attention_mask=None, position_ids=None,
                image_flags=None, past_key_values=None, labels=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        image_flags = image_flags.squeeze(-1)
        vit_embeds = self.extract_feature(pixel_values)[image_flags == 1]
        embeds = self._splice(input_ids, vit_embeds)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=use_cache)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None,
                 visual_features=None, generation_config=None, output_hidden_states=None,
                 **generate_kwargs):
        assert self.img_context_token_id is not None
        if pixel_values is not None:
            embeds = self._splice(input_ids, self.extract_feature(pixel_values))
        else:
            embeds = self.embed(input_ids)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                            generation_config=generation_config, use_cache=True,
                                            **generate_kwargs)
"""
)

PHI3_MODELING = (
    CORE
    + """

class Phi3VConfig(FakeConfigBase):
    model_type = "fake_phi3_v"

    def __init__(self, tokens_per_crop=4, **kwargs):
        self.tokens_per_crop = tokens_per_crop
        super().__init__(**kwargs)


class Phi3VForCausalLM(FakeBase):
    config_class = Phi3VConfig

    def _embeds(self, input_ids, pixel_values, image_sizes):
        # as Phi-3-V's image embedding: every image's features, in order, fill the negative
        # placeholder positions of the batch row after row
        embeds = self.embed(input_ids)
        if pixel_values is not None:
            feats = self.features(pixel_values.flatten(0, 1), self.config.tokens_per_crop)
            feats = feats.reshape(-1, feats.shape[-1])
            where = (input_ids < 0).nonzero()
            assert len(where) == len(feats), (len(where), len(feats))
            embeds[where[:, 0], where[:, 1]] = feats.to(embeds.dtype)
        return embeds

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, pixel_values=None, image_sizes=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        embeds = self._embeds(input_ids, pixel_values, image_sizes)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=use_cache)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, image_sizes=None,
                 **kwargs):
        embeds = self._embeds(input_ids, pixel_values, image_sizes)
        new = self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                           **kwargs)
        return torch.cat([input_ids, new], dim=1)
"""
)

PHI3_PROCESSING = """
import json
import os
import re

import numpy as np
import torch
from transformers import AutoTokenizer, BatchFeature


class Phi3VProcessor:
    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        pass  # ProcessorMixin's hook; nothing to register for a loaded class

    def __init__(self, tokenizer, image_size, num_crops, tokens_per_crop):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_crops = num_crops
        self.tokens_per_crop = tokens_per_crop

    @classmethod
    def from_pretrained(cls, path, trust_remote_code=False, num_crops=None, **kwargs):
        with open(os.path.join(path, "processor_config.json")) as f:
            cfg = json.load(f)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(tokenizer, cfg["image_size"], num_crops or cfg["num_crops"],
                   cfg["tokens_per_crop"])

    def _pixels(self, image):
        s = self.image_size
        whole = torch.from_numpy(np.asarray(image.resize((s, s)), dtype=np.float32))
        whole = whole.permute(2, 0, 1) / 255.0
        crops = [whole] + [whole.flip(-1 - (i % 2)) for i in range(self.num_crops - 1)]
        return torch.stack(crops)

    def __call__(self, text, images=None, padding=False, truncation=None, max_length=None,
                 return_tensors="pt"):
        chunks = re.split(r"<\\|image_\\d+\\|>", text)
        ids = [self.tokenizer.bos_token_id]
        for i, chunk in enumerate(chunks):
            if i > 0:
                ids += [-i] * (self.num_crops * self.tokens_per_crop)
            ids += self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
        data = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids),
                                                                            dtype=torch.long)}
        if images:
            data["pixel_values"] = torch.stack([self._pixels(im) for im in images])
            data["image_sizes"] = torch.tensor([[im.height, im.width] for im in images])
        return BatchFeature(data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)
"""

MOLMO_MODELING = (
    CORE
    + """

class MolmoConfig(FakeConfigBase):
    model_type = "fake_molmo"

    def __init__(self, patch_dim=48, **kwargs):
        self.patch_dim = patch_dim
        super().__init__(**kwargs)


class MolmoForCausalLM(FakeBase):
    config_class = MolmoConfig

    def __init__(self, config):
        super().__init__(config)
        self.patch_proj = nn.Linear(config.patch_dim, config.llm_config["hidden_size"])

    def _embeds(self, input_ids, images, image_input_idx):
        embeds = self.embed(input_ids)
        if images is not None:
            feats = 4.0 * self.patch_proj(images.to(self.patch_proj.weight.dtype))
            feats = feats.flatten(1, 2)
            index = image_input_idx.flatten(1)
            for row in range(input_ids.shape[0]):
                embeds[row, index[row]] = feats[row].to(embeds.dtype)
        return embeds

    def forward(self, input_ids, inputs_embeds=None, attention_mask=None, attention_bias=None,
                response_mask=None, images=None, image_masks=None, image_input_idx=None,
                subsegment_ids=None, position_ids=None, past_key_values=None, labels=None,
                loss_masks=None, use_cache=None, last_logits_only=False, output_attentions=None,
                output_hidden_states=None, append_last_valid_logits=None, return_dict=None,
                cache_position=None):
        if attention_mask is None:
            attention_mask = input_ids != -1
            position_ids = torch.clamp(torch.cumsum(attention_mask.long(), dim=-1) - 1, min=0)
        embeds = self._embeds(input_ids, images, image_input_idx)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask.long(),
                                   position_ids=position_ids, use_cache=use_cache)

    @torch.no_grad()
    def generate_from_batch(self, batch, generation_config=None, **kwargs):
        input_ids = batch["input_ids"]
        embeds = self._embeds(input_ids, batch.get("images"), batch.get("image_input_idx"))
        mask = (input_ids != -1).long()
        new = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                           generation_config=generation_config, **kwargs)
        return torch.cat([input_ids, new], dim=1)
"""
)

MOLMO_PROCESSING = """
import numpy as np
import torch
from transformers import AutoTokenizer


class MolmoProcessor:
    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        pass  # ProcessorMixin's hook; nothing to register for a loaded class

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path, trust_remote_code=False, **kwargs):
        return cls(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))

    def process(self, text=None, images=None, **kwargs):
        tok = self.tokenizer
        ids = [tok.bos_token_id]
        out = {}
        if images:
            patch = tok.convert_tokens_to_ids("<im_patch>")
            start = len(ids) + 1
            ids += [tok.convert_tokens_to_ids("<im_start>")] + [patch] * 4
            ids += [tok.convert_tokens_to_ids("<im_end>")]
            image = images[0].resize((8, 8))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)) / 255.0
            grid = pixels.reshape(2, 4, 2, 4, 3).permute(0, 2, 1, 3, 4).reshape(4, 48)
            out["images"] = grid.unsqueeze(0)
            out["image_input_idx"] = torch.arange(start, start + 4).unsqueeze(0)
            out["image_masks"] = torch.ones(1, 4)
        ids += tok.encode(" User: " + text + " Assistant:", add_special_tokens=False)
        out["input_ids"] = torch.tensor(ids)
        return out
"""

COGVLM_MODELING = (
    CORE
    + """

import numpy as np

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


class CogVLMConfig(FakeConfigBase):
    model_type = "fake_cogvlm"

    def __init__(self, image_size=12, vision_tokens=4, template_version="chat", **kwargs):
        self.image_size = image_size
        self.vision_tokens = vision_tokens
        self.template_version = template_version
        super().__init__(**kwargs)


class CogVLMForCausalLM(FakeBase):
    config_class = CogVLMConfig

    def __init__(self, config):
        super().__init__(config)
        self.boi = nn.Parameter(torch.randn(1, 1, config.llm_config["hidden_size"]))
        self.eoi = nn.Parameter(torch.randn(1, 1, config.llm_config["hidden_size"]))

    def build_conversation_input_ids(self, tokenizer, *, query, history=None, images=None,
                                     template_version=None):
        template_version = template_version or self.config.template_version
        assert template_version == "chat"
        text = f"Question: {query} Answer:"
        ids, types, pixels = [tokenizer.bos_token_id], [LANGUAGE_TOKEN_TYPE], None
        if images:
            s = self.config.image_size
            pixels = torch.from_numpy(np.asarray(images[0].resize((s, s)), dtype=np.float32))
            pixels = pixels.permute(2, 0, 1) / 255.0
            n = self.config.vision_tokens + 2
            ids += [tokenizer.pad_token_id] * n
            types += [VISION_TOKEN_TYPE] * n
        text_ids = tokenizer.encode(text, add_special_tokens=False)
        ids += text_ids
        types += [LANGUAGE_TOKEN_TYPE] * len(text_ids)
        return {"input_ids": torch.tensor(ids), "token_type_ids": torch.tensor(types),
                "attention_mask": torch.ones(len(ids), dtype=torch.long),
                "images": [pixels] if pixels is not None else None}

    def _embeds(self, input_ids, token_type_ids, images):
        embeds = self.embed(input_ids)
        if images is not None:
            pixels = torch.stack([im for row in images for im in row])
            feats = self.features(pixels, self.config.vision_tokens)
            b = feats.shape[0]
            feats = torch.cat([self.boi.expand(b, 1, -1), feats, self.eoi.expand(b, 1, -1)], 1)
            for row in range(input_ids.shape[0]):
                where = (token_type_ids[row] == VISION_TOKEN_TYPE).nonzero().flatten()
                embeds[row, where] = feats[row].to(embeds.dtype)
        return embeds

    def forward(self, input_ids=None, images=None, token_type_ids=None, attention_mask=None,
                position_ids=None, past_key_values=None, inputs_embeds=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None,
                labels=None):
        embeds = self._embeds(input_ids, token_type_ids, images)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                   use_cache=use_cache)

    @torch.no_grad()
    def generate(self, input_ids=None, token_type_ids=None, attention_mask=None, images=None,
                 **kwargs):
        embeds = self._embeds(input_ids, token_type_ids, images)
        new = self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                           **kwargs)
        return torch.cat([input_ids, new], dim=1)
"""
)

# family -> (files, config auto_map, model class entry, extra config fields)
FAKES = {
    "internvl2": (
        {"modeling_internvl_chat.py": INTERNVL_MODELING, "conversation.py": INTERNVL_CONVERSATION},
        "AutoModel",
        "modeling_internvl_chat.InternVLChatModel",
        "modeling_internvl_chat.InternVLChatConfig",
    ),
    "phi3_vision": (
        {"modeling_phi3_v.py": PHI3_MODELING, "processing_phi3_v.py": PHI3_PROCESSING},
        "AutoModelForCausalLM",
        "modeling_phi3_v.Phi3VForCausalLM",
        "modeling_phi3_v.Phi3VConfig",
    ),
    "molmo": (
        {"modeling_molmo.py": MOLMO_MODELING, "processing_molmo.py": MOLMO_PROCESSING},
        "AutoModelForCausalLM",
        "modeling_molmo.MolmoForCausalLM",
        "modeling_molmo.MolmoConfig",
    ),
    "cogvlm": (
        {"modeling_cogvlm.py": COGVLM_MODELING},
        "AutoModelForCausalLM",
        "modeling_cogvlm.CogVLMForCausalLM",
        "modeling_cogvlm.CogVLMConfig",
    ),
}
PROCESSORS = {
    "phi3_vision": (
        "processing_phi3_v.Phi3VProcessor",
        {"image_size": 8, "num_crops": 2, "tokens_per_crop": 4},
    ),
    "molmo": ("processing_molmo.MolmoProcessor", {}),
}


def _tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer; byte-level ("Ġword") for Molmo, whose Qwen2/OLMo tokenizers are
    byte-level BPE (its generation stops on a string, which needs byte-level tokens)."""
    words = sorted(set(WORDS))
    if family == "molmo":
        words = sorted({*words, *(f"Ġ{w}" for w in words), "Ċ"})
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if family == "molmo":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    else:
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    eos = {"internvl2": "<|im_end|>", "molmo": "<|endoftext|>", "phi3_vision": "<|end|>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token=eos.get(family, "</s>"),
        additional_special_tokens=SPECIAL[4:],
    )
    if family == "phi3_vision":
        tokenizer.chat_template = PHI3_TEMPLATE
    return tokenizer


def _write_fake(family: str, folder: Path) -> None:
    """A remote-code model folder of ``family``: code, config with auto_map, tokenizer,
    processor config and safetensors weights of a randomly initialised tiny model."""
    files, auto_model, model_entry, config_entry = FAKES[family]
    for filename, source in files.items():
        (folder / filename).write_text(source)
    tokenizer = _tokenizer(family)
    config = {
        "auto_map": {"AutoConfig": config_entry, auto_model: model_entry},
        "architectures": [model_entry.split(".")[1]],
        "llm_config": {
            **TEXT_CONFIG,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_dir = folder / "tokenizer" if family == "cogvlm" else folder  # Vicuna's, apart
    tokenizer.save_pretrained(tokenizer_dir)
    if family in PROCESSORS:
        entry, fields = PROCESSORS[family]
        (folder / "processor_config.json").write_text(
            json.dumps({"auto_map": {"AutoProcessor": entry}, **fields})
        )
    loaded = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model_class = get_class_from_dynamic_module(model_entry, folder)
    torch.manual_seed(0)
    model = model_class(loaded)
    with torch.no_grad():
        # random tiny models mostly emit special tokens; favour words so answers have text
        head = model.language_model.lm_head.weight
        head.mul_(50.0)
        head[: len(SPECIAL)] = 0.0
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )


@pytest.fixture(scope="module")
def fake_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"fake_{family}")
        _write_fake(family, folder)
        dirs[family] = folder
    return dirs


@pytest.fixture(scope="module")
def adapters(fake_dirs) -> dict[str, remote_runners.RemoteVLM]:
    return {
        family: load_remote_vlm(folder, family, trust_remote_code=True, name=f"hub-{family}")
        for family, folder in fake_dirs.items()
    }


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _items() -> list[MCQItem]:
    """Eight questions: different image sizes and aspect ratios (1 to 7 InternVL tiles), one
    text-only question, one grayscale image."""
    sizes = [(28, 28), (60, 30), (30, 90), (100, 50), (40, 40), (90, 30), (56, 84)]
    items = [
        MCQItem(qid=f"q{i}", image=_image(i, size), prompt=PROMPT, options=OPTIONS)
        for i, size in enumerate(sizes)
    ]
    items[4] = MCQItem(qid="q4", image=items[4].image.convert("L"), prompt=PROMPT, options=OPTIONS)
    items.append(MCQItem(qid="q7", image=None, prompt=PROMPT, options=OPTIONS))
    return items


@torch.no_grad()
def _manual_logits(adapter, item: MCQItem, cont: list[int]) -> torch.Tensor:
    """Logits [T, V] of the prompt followed by ``cont``, batch of one, no padding, by a direct
    call of the fake model's forward."""
    inputs = adapter.prompt_inputs(item)
    ids = torch.cat([inputs["input_ids"], torch.tensor([cont], dtype=torch.long)], dim=1)
    ones = torch.ones_like(ids)
    model = adapter.model
    if adapter.family == "internvl2":
        if inputs["pixel_values"] is None:
            return model.language_model(input_ids=ids, attention_mask=ones).logits[0]
        pixels = inputs["pixel_values"]
        flags = torch.ones(pixels.shape[0], 1, dtype=torch.long)
        out = model(pixel_values=pixels, input_ids=ids, attention_mask=ones, image_flags=flags)
        return out.logits[0]
    if adapter.family == "phi3_vision":
        extra = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
        return model(input_ids=ids, attention_mask=ones, **extra).logits[0]
    if adapter.family == "molmo":
        extra = {k: inputs[k] for k in ("images", "image_masks", "image_input_idx") if k in inputs}
        return model(input_ids=ids, **extra).logits[0]
    types = torch.cat([inputs["token_type_ids"], torch.zeros(1, len(cont), dtype=torch.long)], 1)
    out = model(input_ids=ids, token_type_ids=types, attention_mask=ones, images=inputs["images"])
    return out.logits[0]


def _manual_score(adapter, item: MCQItem, text: str) -> float:
    cont = adapter.continuation_ids(item, text)
    n = adapter.prompt_inputs(item)["input_ids"].shape[1]
    logp = torch.log_softmax(_manual_logits(adapter, item, cont)[n - 1 : n - 1 + len(cont)], -1)
    return float(logp[torch.arange(len(cont)), cont].sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_real_remote_code_and_answers(adapters, fake_dirs, family):
    adapter = adapters[family]
    assert adapter.name == f"hub-{family}"
    assert adapter.family == family
    # the model class came from the folder's own code, through transformers' dynamic modules
    assert type(adapter.model).__module__.startswith("transformers_modules")
    answers = adapter.generate(_items()[:3], max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert any(answers), answers  # a random tiny model still writes words


@pytest.mark.parametrize("family", FAMILIES)
def test_predictions_identical_at_batch_sizes_1_3_8(adapters, family):
    adapter = adapters[family]
    items = _items()
    runs = {
        size: [
            answer
            for start in range(0, len(items), size)
            for answer in adapter.generate(items[start : start + size], max_new_tokens=5)
        ]
        for size in (1, 3, 8)
    }
    assert runs[1] == runs[3] == runs[8]
    assert len(set(runs[1])) > 1  # the image changes the answer: features reach the model


@pytest.mark.parametrize("family", FAMILIES)
def test_first_generated_token_is_the_forward_argmax(adapters, family):
    """Generation and the forward pass see the same prompt and image features."""
    adapter = adapters[family]
    for item in (_items()[1], _items()[7]):
        logits = _manual_logits(adapter, item, [])
        best = int(logits[-1].argmax())
        expected = adapter.tokenizer.decode([best], skip_special_tokens=True).strip()
        assert adapter.generate([item], max_new_tokens=1) == [expected]


@pytest.mark.parametrize("family", FAMILIES)
def test_continuation_logprobs_match_manual_forward(adapters, family):
    adapter = adapters[family]
    items = [_items()[2], _items()[7]]
    letters = list("ABCDE")
    scores = adapter.continuation_logprobs(items, [OPTIONS, letters])
    assert len(scores) == 2 and len(scores[0]) == 5 and len(scores[1]) == 5
    for text, value in zip(OPTIONS, scores[0], strict=True):
        assert len(adapter.continuation_ids(items[0], text)) > 1  # multi-token path
        assert value == pytest.approx(_manual_score(adapter, items[0], text), abs=1e-4)
    for text, value in zip(letters, scores[1], strict=True):
        assert value == pytest.approx(_manual_score(adapter, items[1], text), abs=1e-4)
    # each item's scores do not depend on its batch
    alone = adapter.continuation_logprobs(items[:1], [OPTIONS])
    assert alone[0] == pytest.approx(scores[0], abs=1e-5)


def test_internvl_prompt_and_tiles(adapters):
    adapter = adapters["internvl2"]
    item = _items()[3]  # 100 x 50 px: a 2 x 1 grid plus the thumbnail
    pixels = remote_runners.internvl_pixels(item.image, adapter.tile, adapter.max_tiles)
    assert tuple(pixels.shape) == (3, 3, 28, 28)
    query = adapter.query(item, [pixels.shape[0]])
    context = "<IMG_CONTEXT>" * (adapter.model.num_image_token * 3)
    assert f"<img>{context}</img>\nwhat type" in query
    assert query.startswith("<|im_start|>system\nyou are a helpful assistant<|im_end|>")
    assert query.endswith("<|im_end|><|im_start|>assistant\n")
    assert remote_runners.internvl_grid(28, 28, 28, 6) == (1, 1)
    assert remote_runners.internvl_grid(300, 100, 28, 6) == (3, 1)


def test_phi3_and_molmo_prompts(adapters):
    phi3 = adapters["phi3_vision"]
    text = phi3.chat_prompt(_items()[0])
    assert text == f"<|user|>\n<|image_1|>\n{PROMPT}<|end|>\n<|assistant|>\n"
    assert (phi3.prompt_inputs(_items()[0])["input_ids"] < 0).sum() == 8  # image tokens
    molmo = adapters["molmo"]
    assert molmo.continuation_ids(_items()[0], "B") == molmo.tokenizer.encode(
        " B", add_special_tokens=False
    )


def test_refuses_without_trust_remote_code(fake_dirs):
    folder = fake_dirs["internvl2"]
    with pytest.raises(ValueError, match=str(folder)):
        load_remote_vlm(folder, "internvl2")
    spec = {"runner": "hub", "name": "hub-x", "family": "internvl2", "style": "llava"}
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_runner({**spec, "trust_remote_code": False}, folder)


@pytest.mark.parametrize("family", [None, "llava", "internvl"])
def test_unknown_or_missing_family_is_a_clear_error(fake_dirs, family):
    with pytest.raises(ValueError, match="not one of internvl2, phi3_vision, molmo, cogvlm"):
        load_remote_vlm(fake_dirs["molmo"], family, trust_remote_code=True)


def test_missing_weights_are_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_remote_vlm(tmp_path, "cogvlm", trust_remote_code=True)


def test_load_runner_dispatches_remote_families(fake_dirs):
    spec = {
        "runner": "hub",
        "name": "hub-cogvlm_chat",
        "family": "cogvlm",
        "style": "cogvlm",
        "trust_remote_code": True,
    }
    runner = load_runner(spec, fake_dirs["cogvlm"])
    assert isinstance(runner, remote_runners.CogVLMVLM)
    assert runner.name == "hub-cogvlm_chat"


def test_image_settings_of_the_eval_spec_reach_the_adapters(fake_dirs, monkeypatch):
    """InternVL2's tiles (12 on MMMU) and Molmo's max_crops come from the config's ``image``
    settings, through ``vlm_eval_spec`` and ``load_runner``; other adapters ignore them."""
    from fgvlm.config import load_config, vlm_eval_spec

    paper = load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")
    (item,) = [i for i in _items() if i.image is not None][:1]
    for benchmark, tiles, upscale in (("flowers", 6, 1), ("mmmu", 12, 2)):
        spec = vlm_eval_spec(paper, "hub-internvl2_8b", benchmark)["model"]
        internvl = load_runner(spec, fake_dirs["internvl2"])
        assert (internvl.max_tiles, internvl.upscale) == (tiles, upscale)
        image = item.image.resize(
            (item.image.width * upscale, item.image.height * upscale), Image.Resampling.BILINEAR
        )
        expected = remote_runners.internvl_pixels(image, internvl.tile, tiles)
        torch.testing.assert_close(internvl._pixels(item), [expected])
    spec = vlm_eval_spec(paper, "hub-molmo_7b_d", "mmstar")["model"]
    molmo = load_runner(spec, fake_dirs["molmo"])
    calls = []
    original = molmo.processor.process

    def spy(text=None, images=None, **kwargs):
        calls.append(kwargs)
        return original(text=text, images=images, **kwargs)

    monkeypatch.setattr(molmo.processor, "process", spy)
    molmo.prompt_inputs(item)
    assert calls == [{"images_kwargs": {"max_crops": 36}}]
    image = {"tiles": 3, "max_crops": 5}
    phi = load_remote_vlm(
        fake_dirs["phi3_vision"], "phi3_vision", trust_remote_code=True, image=image
    )
    assert isinstance(phi, remote_runners.Phi3VisionVLM)


def _two_image_item(first: Image.Image, second: Image.Image) -> MCQItem:
    return MCQItem("mm", first, PROMPT, OPTIONS, extra_images=(second,))


def test_internvl_several_images_as_vlmevalkit_asks(adapters):
    """VLMEvalKit's InternVLChat.generate_v2: "Image-k: <image>" lines, the question, then
    "<Image-1><Image-2>"; each image its own tiles; only the first upscaled on MMMU."""
    adapter = adapters["internvl2"]
    item = _two_image_item(_image(1, (100, 50)), _image(2, (28, 28)))
    query = adapter.query(item, [3, 1])
    context = adapter.model.num_image_token * "<IMG_CONTEXT>"
    assert (
        f"Image-1: <img>{context * 3}</img>\nImage-2: <img>{context}</img>\n"
        f"{PROMPT}<Image-1><Image-2><|im_end|>" in query
    )
    pixels = adapter._pixels(item)
    assert [tuple(p.shape) for p in pixels] == [(3, 3, 28, 28), (1, 3, 28, 28)]
    upscaling = remote_runners.InternVL2VLM(
        adapter.model, adapter.tokenizer, name="x", tiles=6, upscale=2
    )
    square = _two_image_item(_image(1, (28, 28)), _image(2, (28, 28)))
    first, second = upscaling._pixels(square)
    assert (first.shape[0], second.shape[0]) == (5, 1)  # 56 x 56 px: 2 x 2 grid + thumbnail


@pytest.mark.parametrize("family", ["internvl2", "phi3_vision"])
def test_every_image_reaches_models_that_take_several(adapters, family):
    adapter = adapters[family]
    first, second = _image(1, (60, 30)), _image(2, (40, 40))
    item, other = _two_image_item(first, second), _two_image_item(first, _image(3, (40, 40)))
    if family == "phi3_vision":
        text = adapter.chat_prompt(item)
        assert text == f"<|user|>\n<|image_1|>\n<|image_2|>\n{PROMPT}<|end|>\n<|assistant|>\n"
    # the second image changes the scores: its features reach the model
    scores = adapter.continuation_logprobs([item, other], [list("AB"), list("AB")])
    assert scores[0] != pytest.approx(scores[1], abs=1e-6)
    for letter, value in zip("AB", scores[0], strict=True):
        assert value == pytest.approx(_manual_score(adapter, item, letter), abs=1e-4)
    batched = adapter.generate([item, _items()[0], other], max_new_tokens=3)
    alone = [adapter.generate([i], max_new_tokens=3)[0] for i in (item, _items()[0], other)]
    assert batched == alone


@pytest.mark.parametrize("family", ["molmo", "cogvlm"])
def test_one_image_models_refuse_several_naming_model_and_question(adapters, family):
    item = _two_image_item(_image(1, (40, 40)), _image(2, (40, 40)))
    with pytest.raises(ValueError, match=f"hub-{family}: question mm has 2 images"):
        adapters[family].generate([item], max_new_tokens=1)
