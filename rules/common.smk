# Config loading and validation, and the helpers rules use to wire inputs and params.
import fgvlm.config as fc

if "benchmarks" not in config:
    # No --configfile: the paper's study, with any --config overrides on top.
    _overrides = dict(config)
    config.clear()
    config.update(fc.load_config(Path(workflow.basedir) / "config" / "config.yaml"))
    config.update(_overrides)
try:
    config.update(fc.validate(config))
except fc.ConfigError as err:
    raise WorkflowError(f"invalid config: {err}") from None

BENCHMARKS = fc.benchmark_names(config)
CLIP_MODELS = fc.clip_model_names(config)
WORLDS = fc.synthetic_world_names(config)
VQA_BENCHMARKS = list(config.get("vqa_benchmarks") or {})
DEVICE = config.get("device", "auto")


wildcard_constraints:
    benchmark="|".join(BENCHMARKS) or "NONE",
    clip="|".join(CLIP_MODELS) or "NONE",
    world="|".join(WORLDS) or "NONE",
    vqa="|".join(VQA_BENCHMARKS) or "NONE",


def rule_resources(rule_name):
    """Snakemake resources for a rule family (config.resources.<rule_name>)."""
    spec = config["resources"].get(rule_name) or {}
    out = {
        "runtime": spec.get("runtime", 60),
        "mem_mb": spec.get("mem_mb", 4000),
        "cpus_per_task": spec.get("cpus", 1),
    }
    if spec.get("gpu"):
        out["gpu"] = spec["gpu"]
    if spec.get("nodes"):
        out["nodes"] = spec["nodes"]
    return out


def manifest_inputs(wildcards):
    """A benchmark's manifest depends on its synthetic world, when it is drawn by the workflow."""
    source = config["benchmarks"][wildcards.benchmark]["source"]
    if source["type"] == "synthetic":
        return {"world": f"data/synthetic/{source['world']}"}
    return {}


def clip_dir(name):
    return f"models/clip/{name}"


def clip_source_inputs(wildcards):
    """A randomly initialised CLIP depends on its model-config file."""
    source = config["clip_models"][wildcards.clip]["source"]
    return [source["model_config"]] if source["type"] == "random_init" else []


# --- training ---------------------------------------------------------------------------------

PRETRAIN_JOBS = fc.pretrain_jobs(config)
TRAINED_RUNS = [row["name"] for row in fc.trained_rows(config)]
ROWS = {row["name"]: row for row in config.get("ablations") or []}


wildcard_constraints:
    pretrain_key="|".join(PRETRAIN_JOBS) or "NONE",
    run="|".join(TRAINED_RUNS) or "NONE",
    llm="|".join(config.get("llms") or {}) or "NONE",
    base="|".join(config.get("base_vlms") or {}) or "NONE",
    data="|".join(config.get("train_data") or {}) or "NONE",


def world_dirs(worlds):
    return [f"data/synthetic/{w}" for w in worlds]


def llm_inputs(wildcards):
    """A tiny LLM is pre-trained on the text of every synthetic world."""
    source = config["llms"][wildcards.llm]["source"]
    return world_dirs(WORLDS) if source["type"] == "tiny" else []


def base_inputs(wildcards):
    source = config["base_vlms"][wildcards.base]["source"]
    if source["type"] == "tiny_qwen2_vl":
        return {"text_model": f"models/llm/{source['text_model']}"}
    return {}


def train_data_inputs(wildcards):
    source = config["train_data"][wildcards.data]["source"]
    return world_dirs(source.get("worlds", []))


def pretrain_inputs(wildcards):
    spec = PRETRAIN_JOBS[wildcards.pretrain_key]
    return {
        "clip": clip_dir(fc.encoder_clip(config, spec["encoder"])),
        "llm": f"models/llm/{spec['llm']}",
        "data": f"shards/train/{spec['data']}",
    }


def finetune_inputs(wildcards):
    row = ROWS[wildcards.run]
    spec = fc.finetune_spec(config, row)
    inputs = {"data": f"shards/train/{spec['data']}"}
    if row["arch"] == "qwen2_vl":
        inputs["base"] = f"models/base/{row['base']}"
        return inputs
    inputs["clip"] = clip_dir(fc.encoder_clip(config, row["vision_encoder"]))
    inputs["llm"] = f"models/llm/{row['llm']}"
    key = fc.pretrain_key_of(config, row)
    if key is not None:
        inputs["init"] = f"runs/{key}/pretrain"
    return inputs
