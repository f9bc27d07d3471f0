# Config loading and validation, and the helpers rules use to wire inputs and params.
import fgvlm.config as fc
import fgvlm.paths as paths

if "benchmarks" not in config:
    # No --configfile: the paper's study, with any --config overrides on top.
    _overrides = dict(config)
    config.clear()
    config.update(fc.load_config(Path(workflow.basedir) / "config" / "config.yaml"))
    config.update(_overrides)
try:
    for _path in workflow.overwrite_configfiles or []:
        fc.read_yaml(_path)  # Snakemake's YAML loader keeps the last of two equal keys
    config.update(fc.validate(config))
except fc.ConfigError as err:
    raise WorkflowError(f"invalid config: {err}") from None

BENCHMARKS = fc.benchmark_names(config)
CLIP_MODELS = fc.clip_model_names(config)
WORLDS = fc.synthetic_world_names(config)
VQA_BENCHMARKS = list(config["vqa_benchmarks"])
DEVICE = config["device"]
PRETRAIN_JOBS = fc.pretrain_jobs(config)
TRAINED_RUNS = [row["name"] for row in fc.trained_rows(config)]
ROWS = {row["name"]: row for row in config["ablations"]}


wildcard_constraints:
    benchmark="|".join(BENCHMARKS) or "NONE",
    clip="|".join(CLIP_MODELS) or "NONE",
    world="|".join(WORLDS) or "NONE",
    vqa="|".join(VQA_BENCHMARKS) or "NONE",
    model="|".join(fc.vlm_models(config)) or "NONE",
    vlm_benchmark="|".join(fc.vlm_benchmarks(config)) or "NONE",
    hub="|".join(config["hub_vlms"]) or "NONE",
    pretrain_key="|".join(PRETRAIN_JOBS) or "NONE",
    run="|".join(TRAINED_RUNS) or "NONE",
    llm="|".join(config["llms"]) or "NONE",
    base="|".join(config["base_vlms"]) or "NONE",
    data="|".join(config["train_data"]) or "NONE",


def rule_resources(family):
    """Snakemake resources of a rule family (config.resources.<family>, schema defaults filled)."""
    spec = config["resources"][family]
    out = {
        "runtime": spec["runtime"],
        "mem_mb": spec["mem_mb"],
        "cpus_per_task": spec["cpus"],
    }
    if spec["gpu"]:
        out["gpu"] = spec["gpu"]
    if "nodes" in spec:
        out["nodes"] = spec["nodes"]
    return out


def rule_threads(family):
    """Threads of a family of rules = its configured CPUs (config.resources.<family>.cpus)."""
    return config["resources"][family]["cpus"]


def job_inputs(inputs_of, *wildcard_names):
    """An input function from a ``fgvlm.paths`` one, called as (config, *wildcard values)."""
    return lambda wildcards: inputs_of(
        config, *(getattr(wildcards, name) for name in wildcard_names)
    )


# --- VLM evaluation ----------------------------------------------------------------------------

VLM_MODELS = fc.vlm_models(config)
VLM_BENCHMARKS = fc.vlm_benchmarks(config)
HUB_VLMS = list(config["hub_vlms"])


def train_download_names(kind):
    """Wildcard pattern of the archives (or URL lists) some train_data source downloads."""
    names = {
        name
        for entry in config["train_data"].values()
        for name in kind(entry["source"])
    }
    return "|".join(sorted(names)) or "NONE"
