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
PRETRAIN_JOBS = fc.pretrain_jobs(config)
TRAINED_RUNS = [row["name"] for row in fc.trained_rows(config)]
ROWS = {row["name"]: row for row in config.get("ablations") or []}


wildcard_constraints:
    benchmark="|".join(BENCHMARKS) or "NONE",
    clip="|".join(CLIP_MODELS) or "NONE",
    world="|".join(WORLDS) or "NONE",
    vqa="|".join(VQA_BENCHMARKS) or "NONE",
    model="|".join(fc.vlm_models(config)) or "NONE",
    vlm_benchmark="|".join(fc.vlm_benchmarks(config)) or "NONE",
    hub="|".join(config.get("hub_vlms") or {}) or "NONE",
    pretrain_key="|".join(PRETRAIN_JOBS) or "NONE",
    run="|".join(TRAINED_RUNS) or "NONE",
    llm="|".join(config.get("llms") or {}) or "NONE",
    base="|".join(config.get("base_vlms") or {}) or "NONE",
    data="|".join(config.get("train_data") or {}) or "NONE",


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


def rule_threads(rule_name):
    """Threads of a family of rules = its configured CPUs (config.resources.<name>.cpus)."""
    return (config["resources"].get(rule_name) or {}).get("cpus", 1)


def clip_dir(name):
    return f"models/clip/{name}"


def clip_source_inputs(wildcards):
    """A tiny CLIP depends on its model-config file and the worlds it is pre-trained on."""
    source = config["clip_models"][wildcards.clip]["source"]
    if source["type"] != "random_init":
        return {}
    worlds = (source.get("pretrain") or {}).get("worlds", [])
    return {
        "model_config": source["model_config"],
        "worlds": [f"data/synthetic/{w}" for w in worlds],
    }


# --- training ---------------------------------------------------------------------------------


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


# --- VLM evaluation ----------------------------------------------------------------------------

VLM_MODELS = fc.vlm_models(config)
VLM_BENCHMARKS = fc.vlm_benchmarks(config)
HUB_VLMS = list(config.get("hub_vlms") or {})


def hub_vlm_inputs(wildcards):
    """A tiny hub stand-in is built from a tiny LLM (tokenizer and language-model weights)."""
    vlm = config["hub_vlms"][wildcards.hub]
    return (
        {"text_model": f"models/llm/{vlm['tiny']['text_model']}"}
        if "tiny" in vlm
        else {}
    )


def eval_vlm_inputs(wildcards):
    inputs = {"model": fc.vlm_model_dir(config, wildcards.model)}
    if wildcards.vlm_benchmark in config["benchmarks"]:
        inputs["data"] = f"shards/questions/{wildcards.vlm_benchmark}"
        inputs["questions"] = f"results/questions/{wildcards.vlm_benchmark}.parquet"
    else:
        inputs["data"] = f"data/vqa/{wildcards.vlm_benchmark}.tsv"
    return inputs


# --- aggregation -------------------------------------------------------------------------------

FIGURES = [
    "figure2",
    "figure3",
    "figure4",
    "figure5",
    "figure6",
    "figure7",
    "figure8",
    "confusion",
]


def ablation_metrics(wildcards):
    """Every ablation row's metrics on every benchmark (predictions come along for intervals)."""
    spec = fc.report_spec(config)
    benchmarks = [*spec["fine_grained"], *spec["general"]]
    models = sorted(set(spec["models"].values()))
    return [
        f"results/{kind}/{model}/{bench}.{ext}"
        for model in models
        for bench in benchmarks
        for kind, ext in (("metrics", "json"), ("predictions", "parquet"))
    ]


def model_metrics(wildcards):
    spec = fc.models_spec(config)
    vlms = expand(
        "results/metrics/{model}/{bench}.json",
        model=spec["hub_models"],
        bench=[*spec["fine_grained"], *spec["general"]],
    )
    clips = expand(
        "results/metrics/{model}/{bench}.json",
        model=spec["clip_models"].values(),
        bench=spec["fine_grained"],
    )
    return vlms + clips


def confusion_details():
    """The per-class view shows the first trained row on the first fine-grained benchmark."""
    rows = fc.trained_rows(config) or config.get("ablations") or []
    model = (
        fc.model_of_row(rows[0]) if rows else f"clip-{config['clip_eval']['models'][0]}"
    )
    return f"results/metrics/{model}/{fc.benchmark_names(config)[0]}.details.json"
