"""The study configuration: load, validate, and expand it into the jobs of the DAG.

A config is plain data (see ``config/config.yaml``). ``validate`` checks it against the JSON schema
and then checks every cross-reference, so that a typo fails before any job starts, with the key
path in the message. The ``*_of`` helpers return exactly the config subtree one job depends on:
rules pass them as ``params`` so that Snakemake reruns only what a change invalidates.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_RESOURCE = "config.schema.yaml"
# Ablation rows whose data is the base VLM's own (released Qwen2-VL, say) say so with these words.
NO_DATA = ("none", "builtin")
ARCH_LABELS = {"llava": "LLaVA", "qwen2_vl": "Qwen2-VL"}


class ConfigError(ValueError):
    """A config value is missing, malformed or refers to something undefined."""


def load_schema() -> dict:
    """The JSON schema of the study config (shipped inside the package); a fresh copy each call."""
    return copy.deepcopy(_parsed_schema())


@functools.cache
def _parsed_schema() -> dict:
    # parsed once per process: validation reads it once per recipe row (~0.2 s a parse)
    text = resources.files("fgvlm.resources").joinpath(SCHEMA_RESOURCE).read_text()
    return yaml.safe_load(text)


def load_config(path: str | Path) -> dict:
    """Read a YAML study config and validate it; errors name the file and the key path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    config = read_yaml(path)
    try:
        return validate(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def read_yaml(path: str | Path) -> Any:
    """A YAML file's data; a malformed file or a mapping with a repeated key is a ConfigError
    naming the file (Snakemake's loader, like plain YAML, keeps the last of two equal keys)."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with a repeated key (plain YAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(f"duplicate key {key!r} (lines {lines[key]} and {line})")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def canonical(value: Any) -> Any:
    """``value`` with every mapping's keys sorted, recursively. Snakemake compares a job's params
    by their ``repr``: reordering keys in the YAML must not rerun anything."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [canonical(item) for item in value]
    return value


def _key_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def validate(config: Any) -> dict:
    """Validate ``config`` (schema, then cross-references); return it with schema defaults filled."""
    if not isinstance(config, dict):
        raise ConfigError("the config must be a mapping at the top level")
    config = copy.deepcopy(config)
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        # oneOf failures are unreadable as-is: report the branch that matched the 'type' field.
        err = _oneof_branch_error(errors[0])
        raise ConfigError(f"{_key_path(err.absolute_path)}: {err.message}")
    _fill_defaults(config, validator.schema, validator)
    _check_references(config)
    return config


def _fill_defaults(instance: Any, schema: dict, validator: jsonschema.Validator) -> None:
    """Fill the schema's ``default`` values into ``instance`` (in place), so code reads every
    optional key directly. Optional objects whose members have defaults (``training``,
    ``evaluation``) are created; in a ``oneOf`` only the branch the instance matches is used."""
    schema = _resolved(schema, validator)
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _fill_defaults(item, schema["items"], validator)
    if not isinstance(instance, dict):
        return
    for branch in schema.get("oneOf", []):
        if next(validator.descend(instance, branch), None) is None:
            _fill_defaults(instance, branch, validator)
            break
    properties = schema.get("properties", {})
    for key, sub in properties.items():
        sub = _resolved(sub, validator)
        if key not in instance:
            if "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            elif sub.get("type") == "object" and not sub.get("required") and _has_defaults(sub):
                instance[key] = {}
        if key in instance:
            _fill_defaults(instance[key], sub, validator)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in properties:
                _fill_defaults(value, extra, validator)


def _resolved(schema: dict, validator: jsonschema.Validator) -> dict:
    while "$ref" in schema:
        schema = validator.schema["$defs"][schema["$ref"].removeprefix("#/$defs/")]
    return schema


def _has_defaults(schema: dict) -> bool:
    return any("default" in sub for sub in schema.get("properties", {}).values())


def _oneof_branch_error(err: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """For a failed ``oneOf`` on an object with a ``type`` field, the error of that type's branch."""
    if err.validator != "oneOf" or not isinstance(err.instance, dict):
        return err
    wanted = err.instance.get("type")
    branches = err.validator_value
    types = [b.get("properties", {}).get("type", {}).get("const") for b in branches]
    if wanted not in types:
        known = [t for t in types if t]
        return jsonschema.ValidationError(
            f"unknown type {wanted!r}; expected one of {known}", path=err.absolute_path
        )
    for sub in err.context or []:
        if sub.schema_path[0] == types.index(wanted):
            return sub
    return err


def _require(value: str, table: dict | None, table_name: str, where: str) -> None:
    if value not in (table or {}):
        known = ", ".join(sorted(table or {})) or "none defined"
        raise ConfigError(f"{where}: {value!r} is not defined in {table_name} (known: {known})")


def _check_references(config: dict) -> None:
    clips = config["clip_models"]
    _require(config["miner"]["clip"], clips, "clip_models", "miner.clip")
    for i, name in enumerate(config["clip_eval"]["models"]):
        _require(name, clips, "clip_models", f"clip_eval.models[{i}]")
    for name, bench in config["benchmarks"].items():
        source = bench["source"]
        if source["type"] == "synthetic":
            _require(
                source["world"],
                config["synthetic_worlds"],
                "synthetic_worlds",
                f"benchmarks.{name}.source.world",
            )
        if "classnames" in bench:
            _require(
                bench["classnames"], _classname_tables(), "classnames.json", f"benchmarks.{name}"
            )
    for name, enc in config["encoders"].items():
        _require(enc["clip"], clips, "clip_models", f"encoders.{name}.clip")
    for name, base in config["base_vlms"].items():
        if "text_model" in base["source"]:
            _require(
                base["source"]["text_model"],
                config["llms"],
                "llms",
                f"base_vlms.{name}.source.text_model",
            )
    for name, vlm in config["hub_vlms"].items():
        if "clip" in vlm:
            _require(vlm["clip"], clips, "clip_models", f"hub_vlms.{name}.clip")
        if "tiny" in vlm:
            _require(
                vlm["tiny"]["text_model"],
                config["llms"],
                "llms",
                f"hub_vlms.{name}.tiny.text_model",
            )
        if "family" in vlm:
            from fgvlm.evaluate.prompts import STYLE_BY_FAMILY

            if vlm["family"] not in STYLE_BY_FAMILY:
                raise ConfigError(
                    f"hub_vlms.{name}.family: {vlm['family']!r} is not one of "
                    f"{sorted(STYLE_BY_FAMILY)}"
                )
        if (vlm.get("image") or {}).get("all_images"):
            from fgvlm.evaluate.prompts import ONE_IMAGE_FAMILIES

            if hub_family(vlm) in ONE_IMAGE_FAMILIES:
                raise ConfigError(
                    f"hub_vlms.{name}.image.all_images: {hub_family(vlm)} models take one "
                    "image per question"
                )
        for benchmark, style in (vlm.get("prompt") or {}).items():
            from fgvlm.evaluate.prompts import STYLES

            if style not in STYLES:
                raise ConfigError(f"hub_vlms.{name}.prompt.{benchmark}: {style!r} not in {STYLES}")
    clash = set(config["benchmarks"]) & set(config["vqa_benchmarks"])
    if clash:
        raise ConfigError(f"vqa_benchmarks: names also used by benchmarks: {sorted(clash)}")
    _check_worlds(config)
    _check_negatives(config)
    _check_ablations(config)
    _check_table1(config)


def _check_worlds(config: dict) -> None:
    """Every world a CLIP pre-trains on or a training source reads is a synthetic world."""
    worlds = config["synthetic_worlds"]
    for name, clip in config["clip_models"].items():
        for i, world in enumerate((clip["source"].get("pretrain") or {}).get("worlds", [])):
            _require(
                world,
                worlds,
                "synthetic_worlds",
                f"clip_models.{name}.source.pretrain.worlds[{i}]",
            )
    for name, data in config["train_data"].items():
        for i, world in enumerate(data["source"].get("worlds", [])):
            _require(world, worlds, "synthetic_worlds", f"train_data.{name}.source.worlds[{i}]")


def _class_count(config: dict, bench: dict) -> int | None:
    """How many classes a benchmark has, where the config alone says (a class table or a
    synthetic world); None for sources only their files describe."""
    if "classnames" in bench:
        return len(_classname_tables()[bench["classnames"]])
    if bench["source"]["type"] == "synthetic":
        from fgvlm.data.synthetic import get_family

        world = config["synthetic_worlds"][bench["source"]["world"]]
        return len(get_family(world["family"]).class_attributes())
    return None


def _check_negatives(config: dict) -> None:
    """A question's negatives are other classes: fewer of them than the benchmark has classes."""
    negatives = config["miner"]["negatives"]
    for name, bench in config["benchmarks"].items():
        count = _class_count(config, bench)
        if count is not None and negatives >= count:
            raise ConfigError(
                f"miner.negatives: {negatives} negatives need more than {negatives} classes, "
                f"but benchmarks.{name} has {count}"
            )


def _check_table1(config: dict) -> None:
    """Table 1's rows name ablation runs or hub VLMs of this study."""
    runs = {row["name"]: row for row in config["ablations"]}
    for i, entry in enumerate(config["report"]["table1"]):
        where = f"report.table1[{i}]"
        if "run" in entry:
            _require(entry["run"], runs, "ablations", f"{where}.run")
        if "model" in entry:
            _require(entry["model"], config["hub_vlms"], "hub_vlms", f"{where}.model")
        if "after" in entry:
            _require(entry["after"], runs, "ablations", f"{where}.after")


def _check_ablations(config: dict) -> None:
    if not config["ablations"]:
        raise ConfigError(
            "ablations: no rows; the study needs at least one (a trained row, or a `hub:` row "
            "evaluating a released VLM)"
        )
    seen: set[str] = set()
    recipes = config["recipes"]
    for i, row in enumerate(config["ablations"]):
        where = f"ablations[{i}] ({row['name']})"
        if row["name"] in seen:
            raise ConfigError(f"{where}: duplicate ablation name {row['name']!r}")
        seen.add(row["name"])
        _require(row["vision_encoder"], config["encoders"], "encoders", f"{where}.vision_encoder")
        _require(row["llm"], config["llms"], "llms", f"{where}.llm")
        if "hub" in row:
            _require(row["hub"], config["hub_vlms"], "hub_vlms", f"{where}.hub")
            continue
        if row["arch"] == "qwen2_vl":
            if "base" not in row:
                raise ConfigError(f"{where}: a trained qwen2_vl row needs 'base' (a base_vlms key)")
            _require(row["base"], config["base_vlms"], "base_vlms", f"{where}.base")
        for field, stage in (("pt_data", "pretrain"), ("ft_data", "finetune")):
            value = row[field]
            if value in NO_DATA:
                continue
            _require(value, config["train_data"], "train_data", f"{where}.{field}")
            if config["train_data"][value]["stage"] != stage:
                declared = config["train_data"][value]["stage"]
                raise ConfigError(
                    f"{where}.{field}: {value!r} is {declared} data, not {stage} data"
                )
        if row["ft_data"] in NO_DATA:
            raise ConfigError(f"{where}.ft_data: a trained row needs finetuning data")
        for stage in ("pretrain", "finetune"):
            override = (row.get("recipes") or {}).get(stage, {})
            _check_recipe_override(override, f"{where}.recipes.{stage}")
            name = recipe_name(row, stage)
            if name is None:
                continue
            _require(name, recipes, "recipes", f"{where} ({stage} recipe)")
            _check_recipe({**recipes[name], **override}, f"{where} ({stage} recipe {name!r})")
            _check_batch(
                {**recipes[name], **override},
                config["resources"].get(stage) or {},
                f"{where} ({stage} recipe {name!r})",
                stage,
            )


def _check_recipe_override(override: dict, where: str) -> None:
    """A row's recipe override holds recipe fields of the recipe schema's types."""
    recipe = load_schema()["properties"]["recipes"]["additionalProperties"]
    schema = {"type": "object", "additionalProperties": False, "properties": recipe["properties"]}
    error = next(iter(jsonschema.Draft202012Validator(schema).iter_errors(override)), None)
    if error is not None:
        path = _key_path(error.absolute_path)
        at = where if path == "<top level>" else f"{where}.{path}"
        raise ConfigError(f"{at}: {error.message}")


def _check_recipe(recipe: dict, where: str) -> None:
    """A row's merged recipe is one the trainer accepts (``Recipe.check``), refused before any job
    (e.g. ``connector_lr_after_unfreeze`` on a recipe that does not unfreeze the LLM)."""
    from fgvlm.training.recipe import Recipe

    try:
        Recipe.from_config(recipe)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _check_batch(recipe: dict, resource: dict, where: str, stage: str) -> None:
    """The global batch splits evenly over the data-parallel ranks' per-device batches."""
    if "per_device_batch" not in recipe:
        return  # the trainer picks a per-device batch that divides it
    ranks = max(1, resource.get("nodes", 1) * resource.get("gpu", 0))
    step = recipe["per_device_batch"] * ranks
    if recipe["global_batch"] % step:
        raise ConfigError(
            f"{where}: global_batch {recipe['global_batch']} is not a multiple of "
            f"per_device_batch {recipe['per_device_batch']} x {ranks} data-parallel ranks "
            f"(resources.{stage}: nodes x gpu)"
        )


def _classname_tables() -> dict:
    text = resources.files("fgvlm.resources").joinpath("classnames.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


# --- expansion: which jobs exist, and what each depends on -------------------------------------


def device_of(config: dict) -> str:
    """The torch device jobs should use ('auto' resolves at run time)."""
    choice = config["device"]
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def benchmark_names(config: dict) -> list[str]:
    return list(config["benchmarks"])


def clip_model_names(config: dict) -> list[str]:
    """Every CLIP model some job needs: the miner's, the baselines' and the encoders'."""
    names = [config["miner"]["clip"], *config["clip_eval"]["models"]]
    names += [enc["clip"] for enc in config["encoders"].values()]
    return list(dict.fromkeys(names))


def synthetic_world_names(config: dict) -> list[str]:
    return list(config["synthetic_worlds"] or {})


def benchmark_spec(config: dict, name: str) -> dict:
    """The config subtree the manifest of benchmark ``name`` depends on (its source and classes)."""
    bench = config["benchmarks"][name]
    spec = {"source": bench["source"]}
    if "classnames" in bench:
        spec["classnames"] = bench["classnames"]
    if bench["source"]["type"] == "synthetic":
        spec["world"] = config["synthetic_worlds"][bench["source"]["world"]]
    return spec


def miner_spec(config: dict) -> dict:
    """What mining depends on: the miner block and its CLIP model's definition."""
    miner = config["miner"]
    return {
        "clip": miner["clip"],
        "clip_source": config["clip_models"][miner["clip"]]["source"],
        "templates": list(miner["templates"]),
        "negatives": miner["negatives"],
        "seed": miner["seed"],
        "precision": miner["precision"],
    }


def clip_eval_spec(config: dict, model: str) -> dict:
    """What one CLIP baseline evaluation depends on."""
    return {
        "clip_source": config["clip_models"][model]["source"],
        "templates": list(config["clip_eval"]["templates"]),
    }


def metric_of(config: dict, benchmark: str) -> str:
    return config["benchmarks"][benchmark]["metric"]


def recipe_name(row: dict, stage: str) -> str | None:
    """The recipe a trained ablation row uses for ``stage`` (None: the row skips that stage)."""
    from fgvlm.training.recipe import recipe_for

    if stage == "pretrain" and row["pt_data"] in NO_DATA:
        return None
    return recipe_for(stage, updating=row["updating"], arch=row["arch"])


def trained_rows(config: dict) -> list[dict]:
    return [row for row in config["ablations"] if "hub" not in row]


def trained_row(config: dict, name: str) -> dict:
    """The trained ablation row called ``name``."""
    rows = {row["name"]: row for row in trained_rows(config)}
    if name not in rows:
        raise ConfigError(f"no trained ablation row {name!r} (known: {', '.join(rows) or 'none'})")
    return rows[name]


def pretrain_spec(config: dict, row: dict) -> dict | None:
    """Everything a row's pretraining depends on; rows with equal specs share one pretraining."""
    name = recipe_name(row, "pretrain")
    if name is None:
        return None
    recipe = {**config["recipes"][name], **(row.get("recipes") or {}).get("pretrain", {})}
    return {
        "encoder": row["vision_encoder"],
        "image_aspect": config["encoders"][row["vision_encoder"]]["image_aspect"],
        "llm": row["llm"],
        "data": row["pt_data"],
        "recipe": recipe,
        "seed": row.get("seed", config["seed"]),
    }


def pretrain_key(spec: dict, default_seed: int) -> str:
    """A readable, stable name for a pretraining job: encoder__llm__data__updating[__seedN]."""
    key = f"{spec['encoder']}__{spec['llm']}__{spec['data']}__{spec['recipe']['updating']}"
    return key if spec["seed"] == default_seed else f"{key}__seed{spec['seed']}"


def pretrain_jobs(config: dict) -> dict[str, dict]:
    """Distinct pretraining jobs, keyed by pretrain_key; rows sharing a spec share the job."""
    jobs: dict[str, dict] = {}
    for row in trained_rows(config):
        spec = pretrain_spec(config, row)
        if spec is None:
            continue
        key = pretrain_key(spec, config["seed"])
        if key in jobs and jobs[key] != spec:
            raise ConfigError(f"ablations: rows share pretraining {key!r} with different recipes")
        jobs[key] = spec
    return jobs


def factor_labels(config: dict, row: dict) -> dict[str, str]:
    """The row's factors as the paper's tables print them."""

    def data_label(value: str) -> str:
        if value == "none":
            return "None"
        if value == "builtin":
            return ARCH_LABELS[row["arch"]]
        return config["train_data"][value].get("label", value)

    return {
        "vision_encoder": config["encoders"][row["vision_encoder"]].get(
            "label", row["vision_encoder"]
        ),
        "llm": config["llms"][row["llm"]].get("label", row["llm"]),
        "arch": ARCH_LABELS[row["arch"]],
        "pt_data": data_label(row["pt_data"]),
        "ft_data": data_label(row["ft_data"]),
        "updating": row["updating"].capitalize(),
    }


def finetune_spec(config: dict, row: dict) -> dict:
    """Everything a trained row's finetuning depends on (its pretraining included, by spec)."""
    name = recipe_name(row, "finetune")
    recipe = {**config["recipes"][name], **(row.get("recipes") or {}).get("finetune", {})}
    spec = {
        "run": row["name"],
        "arch": row["arch"],
        "data": row["ft_data"],
        "recipe": recipe,
        "seed": row.get("seed", config["seed"]),
        "pretrain": pretrain_spec(config, row),
    }
    if row["arch"] == "qwen2_vl":
        spec["base"] = row["base"]
        spec["base_source"] = config["base_vlms"][row["base"]]["source"]
    else:
        spec["encoder"] = row["vision_encoder"]
        spec["image_aspect"] = config["encoders"][row["vision_encoder"]]["image_aspect"]
        spec["llm"] = row["llm"]
        spec["template"] = config["llms"][row["llm"]]["template"]
    return spec


def pretrain_key_of(config: dict, row: dict) -> str | None:
    spec = pretrain_spec(config, row)
    return None if spec is None else pretrain_key(spec, config["seed"])


def encoder_clip(config: dict, encoder: str) -> str:
    return config["encoders"][encoder]["clip"]


# --- VLM evaluation ----------------------------------------------------------------------------


def hub_family(vlm: dict) -> str:
    """The prompt family of a hub VLM: configured, the tiny stand-in's architecture, or from its repo."""
    from fgvlm.evaluate.prompts import family_of_repo

    if "family" in vlm:
        return vlm["family"]
    if "tiny" in vlm:
        return vlm["tiny"]["arch"]
    return family_of_repo(vlm["repo"])


def hub_vlm_spec(config: dict, name: str) -> dict:
    """What fetching (or building) hub VLM ``name`` depends on: not its label, prompt family,
    scoring mode or CLIP, which only evaluation and the report read."""
    vlm = config["hub_vlms"][name]
    keys = ("repo", "revision", "tiny", "trust_remote_code", "tokenizer")
    return {key: vlm[key] for key in keys if key in vlm}


def model_of_row(row: dict) -> str:
    """The results name of an ablation row: its run name, or hub-<name> for released rows."""
    return f"hub-{row['hub']}" if "hub" in row else row["name"]


def vlm_models(config: dict) -> dict[str, dict]:
    """Every VLM evaluated: trained ablation rows and hub VLMs, by results name."""
    evaluation = config["evaluation"]
    mode = evaluation["mode"]
    max_new = evaluation["max_new_tokens"]
    option_prompt = evaluation["option_prompt"]
    dtype = evaluation["dtype"]  # bf16 and fp32 answers may differ: a change reruns evaluation
    models = {}
    for row in trained_rows(config):
        # every trained row, the Qwen2-VL one too, is asked in LLaVA's evaluation wording
        runner = "hub" if row["arch"] == "qwen2_vl" else "trained"
        models[row["name"]] = {
            "runner": runner,
            "name": row["name"],
            "family": evaluation["trained_family"],
            "mode": mode,
            "max_new_tokens": max_new,
            "option_prompt": option_prompt,
            "dtype": dtype,
        }
    for key, vlm in config["hub_vlms"].items():
        image = dict(vlm.get("image") or {})
        # Qwen2-VL's pixel range is a processor argument, as VLMEvalKit passes it
        pixels = {k: image.pop(k) for k in ("min_pixels", "max_pixels") if k in image}
        processor_kwargs = {**(vlm.get("processor_kwargs") or {}), **pixels}
        models[f"hub-{key}"] = {
            "runner": "hub",
            "name": f"hub-{key}",
            "family": hub_family(vlm),
            "mode": vlm.get("mode", mode),
            "max_new_tokens": (vlm.get("generation") or {}).get("max_new_tokens", max_new),
            "option_prompt": option_prompt,
            "dtype": dtype,
            "trust_remote_code": vlm["trust_remote_code"],
            "system_prompt": vlm["system_prompt"],
            "prompt": dict(vlm.get("prompt") or {}),
            **({"image": image} if image else {}),
            **({"processor_kwargs": processor_kwargs} if processor_kwargs else {}),
        }
    return models


def vlm_benchmarks(config: dict) -> list[str]:
    return [*config["benchmarks"], *config["vqa_benchmarks"]]


def vlm_benchmark_spec(config: dict, benchmark: str) -> dict:
    """How a benchmark's questions are read, and its primary metric."""
    if benchmark in config["benchmarks"]:
        return {"format": "questions", "metric": config["benchmarks"][benchmark]["metric"]}
    vqa = config["vqa_benchmarks"][benchmark]
    return {
        "format": "vlmeval_tsv",
        "split": vqa["source"].get("split"),
        "metric": "accuracy",
        "expected_count": vqa["expected_count"],
        "accept_count_mismatch": vqa["accept_count_mismatch"],
    }


def vlm_eval_spec(config: dict, model: str, benchmark: str) -> dict:
    """What one (VLM, benchmark) evaluation depends on, resolved for the benchmark: the prompt
    style (the model's ``prompt`` entry for the benchmark, ``fine_grained`` for a ``benchmarks``
    entry, else its family's default) and per-benchmark image settings (``<key>_by_benchmark``
    sets ``<key>``: InternVL2's tiles and upscaling on MMMU)."""
    from fgvlm.evaluate.prompts import STYLES, style_for

    spec = dict(vlm_models(config)[model])
    styles = spec.pop("prompt", {})
    kind = "fine_grained" if benchmark in config["benchmarks"] else None
    style = styles.get(benchmark) or styles.get(kind) or style_for(spec["family"])
    if style not in STYLES:
        raise ConfigError(f"{model}: prompt style {style!r} for {benchmark} is not one of {STYLES}")
    spec["style"] = style
    if "image" in spec:
        image = {k: v for k, v in spec["image"].items() if not k.endswith("_by_benchmark")}
        for key, by_benchmark in spec["image"].items():
            if key.endswith("_by_benchmark") and benchmark in by_benchmark:
                image[key.removesuffix("_by_benchmark")] = by_benchmark[benchmark]
        # only a general benchmark's questions have several images: elsewhere it changes nothing
        if image.pop("all_images", False) and kind is None:
            spec["all_images"] = True
        if image:
            spec["image"] = image
        else:
            del spec["image"]
    return {"model": spec, "benchmark": vlm_benchmark_spec(config, benchmark)}


# --- aggregation -------------------------------------------------------------------------------


FACTOR_KEYS = ("vision_encoder", "llm", "arch", "pt_data", "ft_data", "updating")


def study_runs(config: dict) -> list[dict[str, str]]:
    """The runs table of a study config: one dict per ablation, run = its name, the factors
    as the paper prints them (``factor_labels``)."""
    return [{"run": row["name"], **factor_labels(config, row)} for row in config["ablations"]]


def effects_exclusions(config: dict) -> list[str]:
    """Rows of a study config to keep out of the effects: in each group of rows with identical
    factors all but one, keeping the first trained row with the default seed, else the group's
    first row (so the paper's released LLaVA-1.5 and its second LLaVA reproduction give way to
    the reproduction of row 12)."""
    default_seed = config["seed"]
    preferred = [
        row["name"] for row in trained_rows(config) if row.get("seed", default_seed) == default_seed
    ]
    runs = study_runs(config)
    groups: dict[tuple, list[str]] = {}
    for run in runs:
        groups.setdefault(tuple(run[f] for f in FACTOR_KEYS), []).append(run["run"])
    dropped: set[str] = set()
    for names in groups.values():
        keep = next((n for n in preferred if n in names), names[0])
        dropped.update(n for n in names if n != keep)
    return [run["run"] for run in runs if run["run"] in dropped]


def report_spec(config: dict) -> dict:
    """What the ablation table, effects, Table 1 and the figures depend on: rows, their factors
    and results names, the benchmark lists, the replicates kept out of the effects, and the
    ``report:`` definitions (Table 1's rows and chain, the effects' pair sets, Figures 2 and 8).
    ``table1_models`` maps Table 1's released models (``model:`` rows) to their results names."""
    rows = config["ablations"]
    vqa = config["vqa_benchmarks"]
    report = dict(config.get("report") or {})
    return {
        "runs": study_runs(config) if rows else [],
        "models": {row["name"]: model_of_row(row) for row in rows},
        "table1_models": {
            entry["model"]: f"hub-{entry['model']}"
            for entry in report.get("table1") or []
            if "model" in entry
        },
        "fine_grained": list(config["benchmarks"]),
        "general": list(vqa),
        "per_class": [
            name
            for name, bench in config["benchmarks"].items()
            if bench.get("metric") == "mean_per_class"
        ],
        "labels": {
            name: bench.get("label", name)
            for name, bench in {**config["benchmarks"], **vqa}.items()
        },
        "exclude": effects_exclusions(config) if rows else [],
        "report": report,
    }


def models_spec(config: dict) -> dict:
    """What Section 3's table depends on: hub VLMs, CLIP baselines, labels and encoders."""
    hub = config["hub_vlms"] or {}
    clips = config["clip_eval"]["models"]
    return {
        "hub_models": [f"hub-{name}" for name in hub],
        "clip_models": {name: f"clip-{name}" for name in clips},
        "fine_grained": list(config["benchmarks"]),
        "general": list(config["vqa_benchmarks"]),
        "model_labels": {
            **{f"hub-{k}": v.get("label", k) for k, v in hub.items()},
            **{k: config["clip_models"][k].get("label", k) for k in clips},
        },
        "encoders": {f"hub-{k}": v["clip"] for k, v in hub.items() if v.get("clip") in clips},
        "repos": {f"hub-{k}": v["repo"] for k, v in hub.items() if "repo" in v},
    }


def row_encoders(config: dict) -> dict[str, str]:
    """Trained LLaVA-architecture rows -> the CLIP model of their vision tower (Figure 3)."""
    return {
        row["name"]: encoder_clip(config, row["vision_encoder"])
        for row in trained_rows(config)
        if row["arch"] == "llava"
    }
