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
