"""The study config: schema errors name the key path; the paper's study expands as the paper says."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fgvlm import config as fc

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "config" / "config.yaml"
DEMO = ROOT / "config" / "demo.yaml"


@pytest.fixture(scope="module")
def paper() -> dict:
    return fc.load_config(PAPER)


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_both_shipped_configs_are_valid():
    for path in (PAPER, DEMO):
        assert fc.load_config(path)["benchmarks"]


def test_paper_config_declares_the_whole_study(paper):
    assert list(paper["benchmarks"]) == ["imagenet", "flowers", "pets", "food"]
    assert paper["benchmarks"]["imagenet"]["metric"] == "mean_per_class"
    assert list(paper["vqa_benchmarks"]) == ["mmbench", "mmmu", "mmstar"]
    assert paper["miner"]["clip"] == "laion_vit_l14"
    assert paper["clip_models"]["laion_vit_l14"]["source"]["pretrained"] == "laion2b_s32b_b82k"
    assert paper["miner"]["negatives"] == 4
    rows = paper["ablations"]
    assert len(rows) == 24  # Table 2
    assert len(fc.trained_rows(paper)) == 22  # "22 ablation experiments"
    assert sorted(r["name"] for r in rows if "hub" in r) == ["llava15_7b", "qwen2vl_7b_instruct"]
    assert len(paper["hub_vlms"]) == 15  # §3
    recipes = paper["recipes"]
    assert recipes["pretrain_connector"]["connector_lr"] == 1e-3
    assert recipes["pretrain_connector"]["global_batch"] == 256
    assert recipes["pretrain_full"]["connector_only_fraction"] == 0.2
    assert recipes["pretrain_full"]["llm_lr"] == 2e-5
    assert recipes["finetune"]["global_batch"] == 128
    assert recipes["finetune"]["llm_lr"] == 2e-5


def test_rows_sharing_a_recipe_share_one_pretraining(paper):
    jobs = fc.pretrain_jobs(paper)
    # 6 LLaVA-PT connector + 1 second-seed reproduction + 4 PixMo connector + 2 full = 13.
    assert len(jobs) == 13
    assert sum(spec["recipe"]["updating"] == "full" for spec in jobs.values()) == 2
    no_pt = [r for r in fc.trained_rows(paper) if fc.pretrain_spec(paper, r) is None]
    assert len(no_pt) == 9  # 8 'None' rows + the Qwen2-VL base row


def test_connector_lr_after_unfreeze_enters_only_the_full_pretraining_params(paper):
    assert paper["recipes"]["pretrain_full"]["connector_lr_after_unfreeze"] is None
    changed = copy.deepcopy(paper)
    changed["recipes"]["pretrain_full"]["connector_lr_after_unfreeze"] = 2e-5
    before, after = fc.pretrain_jobs(paper), fc.pretrain_jobs(changed)
    assert before.keys() == after.keys()
    differ = sorted(key for key in before if before[key] != after[key])
    assert differ == sorted(k for k, spec in before.items() if spec["recipe"]["updating"] == "full")
    assert len(differ) == 2
    # the train rules' params are the canonical specs: a full row's finetuning reruns too
    rows = fc.trained_rows(paper)
    reruns = [
        row["name"]
        for row in rows
        if fc.canonical(fc.finetune_spec(paper, row))
        != fc.canonical(fc.finetune_spec(changed, row))
    ]
    assert reruns == ["dfn_qwen2_llavapt_full", "dfn_qwen2_pixmo_full"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-2e-5, "recipes.pretrain_full.connector_lr_after_unfreeze: -2e-05 is less than or equal"),
        ("2e-5", "recipes.pretrain_full.connector_lr_after_unfreeze: '2e-5' is not of type"),
    ],
)
def test_connector_lr_after_unfreeze_must_be_a_positive_number(value, message):
    cfg = copy.deepcopy(raw(PAPER))
    cfg["recipes"]["pretrain_full"]["connector_lr_after_unfreeze"] = value
    assert message in _invalid(cfg)
    cfg["recipes"]["pretrain_full"]["connector_lr_after_unfreeze"] = 2e-5
    assert fc.validate(cfg)


def test_connector_lr_after_unfreeze_is_refused_on_a_connector_only_recipe():
    cfg = copy.deepcopy(raw(PAPER))
    cfg["recipes"]["pretrain_connector"]["connector_lr_after_unfreeze"] = 2e-5
    assert _invalid(cfg) == (
        "ablations[1] (clip_vicuna_llavapt_seed1) (pretrain recipe 'pretrain_connector'): "
        "recipe.connector_lr_after_unfreeze: only an updating 'full' recipe unfreezes the LLM "
        "after the connector, not 'connector'"
    )


def test_factor_labels_follow_the_paper(paper):
    row = next(r for r in paper["ablations"] if r["name"] == "dfn_qwen2_pixmo_full")
    assert fc.factor_labels(paper, row) == {
        "vision_encoder": "DFN ViT-H/14@378",
        "llm": "Qwen2-7B",
        "arch": "LLaVA",
        "pt_data": "PixMo",
        "ft_data": "LLaVA",
        "updating": "Full",
    }
    qwen = next(r for r in paper["ablations"] if r["name"] == "qwen2vl_7b_instruct")
    assert fc.factor_labels(paper, qwen)["pt_data"] == "Qwen2-VL"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(unknown_key=1), "Additional properties are not allowed ('unknown_key'"),
        (lambda c: c["miner"].update(negatives="four"), "miner.negatives: 'four' is not of type"),
        (
            lambda c: c["miner"].update(clip="no_such_clip"),
            "miner.clip: 'no_such_clip' is not defined in clip_models",
        ),
        (
            lambda c: c["miner"].update(templates=["a photo"]),
            "miner.templates[0]: 'a photo' does not match",
        ),
        (
            lambda c: c["ablations"][3].update(llm="gpt5"),
            "ablations[3] (clip_llama2_nopt).llm: 'gpt5' is not defined in llms",
        ),
        (
            lambda c: c["ablations"][5].update(vision_encoder="vit_x"),
            "ablations[5] (dfn_vicuna_nopt).vision_encoder: 'vit_x'",
        ),
        (
            lambda c: c["ablations"][11].update(pt_data="laion"),
            ".pt_data: 'laion' is not defined in train_data",
        ),
        (
            lambda c: c["ablations"][11].update(pt_data="llava_ft"),
            "'llava_ft' is finetune data, not pretrain data",
        ),
        (
            lambda c: c["benchmarks"]["flowers"]["source"].update(name="cub200"),
            "benchmarks.flowers.source.name: 'cub200' is not one of",
        ),
        (
            lambda c: c["benchmarks"]["pets"]["source"].update(type="s3"),
            "benchmarks.pets.source: unknown type 's3'",
        ),
        (
            lambda c: c["clip_eval"]["models"].append("nope"),
            "clip_eval.models[3]: 'nope' is not defined",
        ),
        (
            lambda c: c["benchmarks"]["food"].pop("metric"),
            "benchmarks.food: 'metric' is a required property",
        ),
        (
            lambda c: c["ablations"].append(dict(c["ablations"][2])),
            "duplicate ablation name 'clip_vicuna_nopt'",
        ),
        (
            lambda c: c["encoders"]["clip_l14_336"].update(clip="openai"),
            "encoders.clip_l14_336.clip: 'openai'",
        ),
    ],
)
def test_schema_errors_name_the_key_path(mutate, message):
    cfg = copy.deepcopy(raw(PAPER))
    mutate(cfg)
    with pytest.raises(fc.ConfigError) as err:
        fc.validate(cfg)
    assert message in str(err.value)


def test_load_config_names_the_file(tmp_path):
    bad = tmp_path / "study.yaml"
    cfg = raw(DEMO)
    cfg["shards"]["samples_per_shard"] = 0
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(fc.ConfigError, match=r"study\.yaml: shards\.samples_per_shard: 0 is less"):
        fc.load_config(bad)
    (tmp_path / "broken.yaml").write_text("seed: [1,\n")
    with pytest.raises(fc.ConfigError, match="broken.yaml: not valid YAML"):
        fc.load_config(tmp_path / "broken.yaml")


def test_job_specs_carry_only_their_own_subtree(paper):
    changed = copy.deepcopy(paper)
    changed["miner"]["templates"] = ["a blurry photo of a {c}"]
    assert fc.miner_spec(changed) != fc.miner_spec(paper)
    assert fc.benchmark_spec(changed, "flowers") == fc.benchmark_spec(paper, "flowers")
    assert fc.clip_eval_spec(changed, "laion_vit_l14") == fc.clip_eval_spec(paper, "laion_vit_l14")


def test_hub_vlm_specs_carry_remote_code_opt_in_and_processor_kwargs(paper):
    models = fc.vlm_models(paper)
    assert models["hub-phi35_vision"]["processor_kwargs"] == {"num_crops": 4}
    assert models["hub-phi35_vision"]["trust_remote_code"] is True
    assert models["hub-llava15_7b"]["trust_remote_code"] is False
    assert "processor_kwargs" not in models["hub-llava15_7b"]
    assert {spec["option_prompt"] for spec in models.values()} == {"cloze"}


def _invalid(cfg: dict) -> str:
    with pytest.raises(fc.ConfigError) as err:
        fc.validate(cfg)
    return str(err.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda c: c["clip_models"]["tiny_p8"]["source"]["pretrain"].update(
                worlds=["shapes", "shapez"]
            ),
            "clip_models.tiny_p8.source.pretrain.worlds[1]: 'shapez' is not defined in "
            "synthetic_worlds (known: patterns, shapes)",
        ),
        (
            lambda c: c["train_data"]["instructions"]["source"].update(worlds=["animals"]),
            "train_data.instructions.source.worlds[0]: 'animals' is not defined in "
            "synthetic_worlds (known: patterns, shapes)",
        ),
        (
            lambda c: c["synthetic_worlds"]["shapes"].update(family="birds"),
            "synthetic_worlds.shapes.family: 'birds' is not one of "
            "['creatures', 'patterns', 'shapes']",
        ),
        (
            lambda c: c["miner"].update(negatives=24),
            "miner.negatives: 24 negatives need more than 24 classes, but benchmarks.shapes has 24",
        ),
        (
            lambda c: c["recipes"]["finetune"].update(per_device_batch=12),
            "ablations[0] (p8_llama_nopt) (finetune recipe 'finetune'): global_batch 32 is not "
            "a multiple of per_device_batch 12 x 1 data-parallel ranks "
            "(resources.finetune: nodes x gpu)",
        ),
        (
            lambda c: c["resources"]["pretrain"].update(gpu=4),
            "ablations[1] (p8_llama_short) (pretrain recipe 'pretrain_connector'): global_batch "
            "32 is not a multiple of per_device_batch 16 x 4 data-parallel ranks "
            "(resources.pretrain: nodes x gpu)",
        ),
        (
            lambda c: c["ablations"][2].update(recipes={"pretrain": {"global_batch": 24}}),
            "ablations[2] (p8_llama_long) (pretrain recipe 'pretrain_connector'): global_batch "
            "24 is not a multiple of per_device_batch 16 x 1 data-parallel ranks",
        ),
        (
            lambda c: c["ablations"][2].update(recipes={"finetune": {"epochs": "two"}}),
            "ablations[2] (p8_llama_long).recipes.finetune.epochs: 'two' is not of type 'number'",
        ),
        (
            lambda c: c["ablations"][2].update(recipes={"finetune": {"learning_rate": 1e-3}}),
            "ablations[2] (p8_llama_long).recipes.finetune: Additional properties are not "
            "allowed ('learning_rate' was unexpected)",
        ),
        (
            lambda c: c["train_data"]["captions_short"]["source"].update(qualty="short"),
            "train_data.captions_short.source: Additional properties are not allowed "
            "('qualty' was unexpected)",
        ),
        (
            lambda c: c["train_data"]["captions_short"]["source"].update(type="laion"),
            "train_data.captions_short.source: unknown type 'laion'; expected one of "
            "['llava_pretrain', 'pixmo_cap', 'llava_instruct', 'synthetic_captions', "
            "'synthetic_instructions']",
        ),
        (
            lambda c: c.update(ablations=[]),
            "ablations: no rows; the study needs at least one (a trained row, or a `hub:` row "
            "evaluating a released VLM)",
        ),
        (
            lambda c: c["report"]["table1"][1].update(run="p8_llama_shrt"),
            "report.table1[1].run: 'p8_llama_shrt' is not defined in ablations (known: ",
        ),
        (
            lambda c: c["report"]["table1"].append({"model": "tiny_llava2"}),
            "report.table1[7].model: 'tiny_llava2' is not defined in hub_vlms "
            "(known: tiny_llava, tiny_qwen2_vl)",
        ),
        (
            lambda c: c["report"]["table1"][3].update(after="p8_short"),
            "report.table1[3].after: 'p8_short' is not defined in ablations",
        ),
    ],
)
def test_demo_config_errors_that_used_to_fail_inside_a_job(mutate, message):
    cfg = copy.deepcopy(raw(DEMO))
    mutate(cfg)
    assert message in _invalid(cfg)


def test_paper_config_errors_name_the_key_path():
    cfg = copy.deepcopy(raw(PAPER))
    cfg["train_data"]["llava_ft"]["source"]["image_root"] = "coco"
    assert _invalid(cfg) == (
        "train_data.llava_ft.source: Additional properties are not allowed "
        "('image_root' was unexpected)"
    )
    cfg = copy.deepcopy(raw(PAPER))
    cfg["recipes"]["finetune"]["per_device_batch"] = 8  # 128 = 8 x 4 nodes x 4 GPUs
    assert fc.validate(cfg)
    cfg["recipes"]["finetune"]["per_device_batch"] = 16
    assert _invalid(cfg) == (
        "ablations[1] (clip_vicuna_llavapt_seed1) (finetune recipe 'finetune'): global_batch 128 is not "
        "a multiple of per_device_batch 16 x 16 data-parallel ranks "
        "(resources.finetune: nodes x gpu)"
    )


def test_synthetic_family_enum_lists_every_family():
    from fgvlm.data.synthetic import FAMILIES

    world = fc.load_schema()["properties"]["synthetic_worlds"]["additionalProperties"]
    assert world["properties"]["family"]["enum"] == sorted(FAMILIES)


def test_duplicated_yaml_key_is_refused_with_both_lines(tmp_path):
    text = DEMO.read_text()
    assert "\nminer:\n  clip: tiny_miner\n" in text
    study = tmp_path / "study.yaml"
    study.write_text(
        text.replace(
            "\nminer:\n  clip: tiny_miner\n", "\nminer:\n  clip: tiny_miner\n  clip: tiny_p8\n"
        )
    )
    line = text.splitlines().index("  clip: tiny_miner") + 1
    with pytest.raises(fc.ConfigError) as err:
        fc.load_config(study)
    assert str(err.value) == f"{study}: duplicate key 'clip' (lines {line} and {line + 1})"
    study.write_text(text + "\nseed: 1\n")
    with pytest.raises(fc.ConfigError, match=r"duplicate key 'seed' \(lines 5 and \d+\)"):
        fc.load_config(study)
    study.write_text("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n")
    assert fc.read_yaml(study)["other"] == {"x": 1, "y": 2}  # a YAML merge is not a duplicate


def test_several_images_for_a_one_image_model_is_refused_before_any_job(tmp_path):
    config = raw(PAPER)
    config["hub_vlms"]["molmo_7b_d"]["image"]["all_images"] = True
    with pytest.raises(fc.ConfigError) as err:
        fc.validate(config)
    message = "hub_vlms.molmo_7b_d.image.all_images: molmo models take one image per question"
    assert str(err.value) == message


def test_all_images_reaches_only_general_benchmark_evaluations(paper):
    """The setting enters the evaluation params of the general benchmarks (so changing it reruns
    those) and not of the fine-grained ones (single-image questions)."""
    assert fc.vlm_eval_spec(paper, "hub-qwen2_vl_7b_instruct", "mmmu")["model"]["all_images"]
    fine = fc.vlm_eval_spec(paper, "hub-qwen2_vl_7b_instruct", "flowers")["model"]
    assert "all_images" not in fine and "all_images" not in fine["image"]
    phi3 = fc.vlm_eval_spec(paper, "hub-phi3_vision", "mmmu")["model"]
    assert "all_images" not in phi3 and "all_images" not in phi3.get("image", {})
    trained = fc.trained_rows(paper)[0]["name"]
    assert "all_images" not in fc.vlm_eval_spec(paper, trained, "mmmu")["model"]
