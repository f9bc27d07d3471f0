"""The DAG's file layout: where every stage reads and writes, for the rules and the CLI alike.

Patterns use the rules' wildcard names, so ``rules/*.smk`` declare them as outputs as they are
and the ``fgvlm`` command fills them (``pattern.format(**wildcards)``). The ``*_inputs``
functions give the input files of one job from the study config; rules call them as input
functions and the CLI calls them for its defaults, so the two cannot drift.
"""

from __future__ import annotations

from fgvlm import config as study

# Data
WORLD = "data/synthetic/{world}"
MANIFEST = "data/{benchmark}/manifest.parquet"
CLASSES = "data/{benchmark}/classes.json"
CANDIDATES = "data/{benchmark}/candidates.json"  # per-image candidate negatives (ImageNet) or null
MANIFEST_STATS = "data/{benchmark}/manifest_stats.json"  # counts beside the expected (paper's)
RAW = "data/raw/{benchmark}"
VQA_TSV = "data/vqa/{vqa}.tsv"
TRAIN_RAW = "data/raw/train/{data}"
TRAIN_ARCHIVE = "data/raw/train/{data}/images/{archive}"  # one extracted image archive
TRAIN_DOWNLOADS = "data/raw/train/{data}/downloads"  # archives while they are extracted
TRAIN_URLS = "data/raw/train/{data}/fetched/{urls}.json"  # a URL list's fetch report

# Models
CLIP = "models/clip/{clip}"
LLM = "models/llm/{llm}"
BASE_VLM = "models/base/{base}"
HUB_VLM = "models/hub/{hub}"

# Questions and shards
QUESTIONS = "results/questions/{benchmark}.parquet"
QUESTION_SHARDS = "shards/questions/{benchmark}"
TRAIN_SHARDS = "shards/train/{data}"

# Training
PRETRAIN = "runs/{pretrain_key}/pretrain"
FINETUNE = "runs/{run}/finetune"
STATE_SUFFIX = ".state"  # resumable state beside a declared output (Snakemake deletes outputs)

# Evaluation ({model}: a trained row, hub-<name> or clip-<name>)
PREDICTIONS = "results/predictions/{model}/{vlm_benchmark}.parquet"
METRICS = "results/metrics/{model}/{vlm_benchmark}.json"
DETAILS = "results/metrics/{model}/{vlm_benchmark}.details.json"
PARTS = "results/parts/{model}/{vlm_benchmark}"

# Report
RESULTS = "results"
TABLES = "results/tables"
FIGURES = "results/figures"
PROVENANCE = f"{TABLES}/provenance.csv"  # every model's and data set's pin
FIGURE_NAMES = ("figure2", "figure3", "figure4", "figure5", "figure6", "figure7", "figure8")


def world_dirs(worlds: list[str]) -> list[str]:
    return [WORLD.format(world=world) for world in worlds]


def state_dir(output_dir: str) -> str:
    return output_dir + STATE_SUFFIX


def manifest_outputs(benchmark: str) -> dict[str, str]:
    return {
        "manifest": MANIFEST.format(benchmark=benchmark),
        "classes": CLASSES.format(benchmark=benchmark),
        "candidates": CANDIDATES.format(benchmark=benchmark),
        "stats": MANIFEST_STATS.format(benchmark=benchmark),
    }


def manifest_inputs(config: dict, benchmark: str) -> dict[str, str]:
    """A synthetic benchmark's manifest is read from its world; other sources are fetched."""
    source = config["benchmarks"][benchmark]["source"]
    if source["type"] == "synthetic":
        return {"world": WORLD.format(world=source["world"])}
    return {}


def clip_inputs(config: dict, clip: str) -> dict[str, object]:
    """A tiny CLIP depends on its model-config file and the worlds it is pre-trained on."""
    source = config["clip_models"][clip]["source"]
    if source["type"] != "random_init":
        return {}
    worlds = source["pretrain"]["worlds"] if "pretrain" in source else []
    return {"model_config": source["model_config"], "worlds": world_dirs(worlds)}


def llm_inputs(config: dict, llm: str) -> dict[str, object]:
    """A tiny LLM is pre-trained on the text of every synthetic world."""
    source = config["llms"][llm]["source"]
    worlds = list(config["synthetic_worlds"]) if source["type"] == "tiny" else []
    return {"worlds": world_dirs(worlds)}


def base_vlm_inputs(config: dict, base: str) -> dict[str, str]:
    source = config["base_vlms"][base]["source"]
    if source["type"] == "tiny_qwen2_vl":
        return {"text_model": LLM.format(llm=source["text_model"])}
    return {}


def hub_vlm_inputs(config: dict, hub: str) -> dict[str, str]:
    """A tiny hub stand-in is built from a tiny LLM (tokenizer and language-model weights)."""
    vlm = config["hub_vlms"][hub]
    return {"text_model": LLM.format(llm=vlm["tiny"]["text_model"])} if "tiny" in vlm else {}


def train_data_inputs(config: dict, data: str) -> dict[str, object]:
    """A source's drawn worlds, extracted image archives and fetched URL lists."""
    source = config["train_data"][data]["source"]
    inputs: dict[str, object] = {"worlds": world_dirs(source.get("worlds", []))}
    archives, url_lists = train_archives(source), train_url_lists(source)
    if archives:
        inputs["archives"] = [TRAIN_ARCHIVE.format(data=data, archive=a) for a in archives]
    if url_lists:
        inputs["fetched"] = [TRAIN_URLS.format(data=data, urls=u) for u in url_lists]
    return inputs


def train_archives(source: dict) -> list[str]:
    """The image archives a source downloads: those whose images the config does not point at."""
    if source["type"] == "llava_pretrain":
        return [] if source["image_root"] else list(source["archives"])
    if source["type"] == "llava_instruct":
        given = source["image_roots"]
        return [name for name, a in source["archives"].items() if a["prefix"] not in given]
    return []


def train_url_lists(source: dict) -> list[str]:
    """The URL lists a source fetches (PixMo-Cap's one, ``images``; OCR-VQA's)."""
    if source["type"] == "pixmo_cap":
        return ["images"]
    if source["type"] == "llava_instruct":
        given = source["image_roots"]
        return [name for name, u in source["url_lists"].items() if u["prefix"] not in given]
    return []


def fetched_dir(report: str) -> str:
    """The parts folder of a URL list beside its report (not a declared output: resumable)."""
    return report.removesuffix(".json")


def question_inputs(config: dict, benchmark: str) -> dict[str, str]:
    """What mining one benchmark reads: its manifest files and the miner's CLIP."""
    files = {k: v for k, v in manifest_outputs(benchmark).items() if k != "stats"}
    return {**files, "clip": CLIP.format(clip=config["miner"]["clip"])}


def clip_eval_inputs(benchmark: str, clip: str) -> dict[str, str]:
    return {
        "shards": QUESTION_SHARDS.format(benchmark=benchmark),
        "classes": CLASSES.format(benchmark=benchmark),
        "clip": CLIP.format(clip=clip),
    }


def eval_outputs(model: str, benchmark: str) -> dict[str, str]:
    wildcards = {"model": model, "vlm_benchmark": benchmark}
    return {
        "predictions": PREDICTIONS.format(**wildcards),
        "metrics": METRICS.format(**wildcards),
        "details": DETAILS.format(**wildcards),
    }


def pretrain_inputs(config: dict, pretrain_key: str) -> dict[str, str]:
    spec = study.pretrain_jobs(config)[pretrain_key]
    return {
        "clip": CLIP.format(clip=study.encoder_clip(config, spec["encoder"])),
        "llm": LLM.format(llm=spec["llm"]),
        "data": TRAIN_SHARDS.format(data=spec["data"]),
    }


def finetune_inputs(config: dict, run: str) -> dict[str, str]:
    """A row finetunes its pretraining (or CLIP + LLM when it has none), or a whole base VLM."""
    row = study.trained_row(config, run)
    inputs = {"data": TRAIN_SHARDS.format(data=row["ft_data"])}
    if row["arch"] == "qwen2_vl":
        return {**inputs, "base": BASE_VLM.format(base=row["base"])}
    inputs["clip"] = CLIP.format(clip=study.encoder_clip(config, row["vision_encoder"]))
    inputs["llm"] = LLM.format(llm=row["llm"])
    key = study.pretrain_key_of(config, row)
    if key is not None:
        inputs["init"] = PRETRAIN.format(pretrain_key=key)
    return inputs


def vlm_dir(model: str) -> str:
    """Where an evaluated VLM's weights are: a hub VLM's folder or a trained row's finetuning."""
    if model.startswith("hub-"):
        return HUB_VLM.format(hub=model.removeprefix("hub-"))
    return FINETUNE.format(run=model)


def eval_vlm_inputs(config: dict, model: str, benchmark: str) -> dict[str, str]:
    inputs = {"model": vlm_dir(model)}
    if benchmark in config["benchmarks"]:
        inputs["data"] = QUESTION_SHARDS.format(benchmark=benchmark)
        inputs["questions"] = QUESTIONS.format(benchmark=benchmark)
    else:
        inputs["data"] = VQA_TSV.format(vqa=benchmark)
    return inputs


def table(name: str) -> str:
    return f"{TABLES}/{name}"


def provenance_inputs(config: dict) -> dict[str, list[str]]:
    """What the provenance table reads, so that a refetch reruns it: the folders of hub-fetched
    CLIP models, LLMs, base and hub VLMs, the VLMEvalKit TSVs, and the shards of the hub-hosted
    training data a trained row uses (their job fetches the files into ``TRAIN_RAW``, where the
    pins are kept; an unused source is not fetched for its row). Sources built locally (tiny,
    synthetic) have nothing to read."""
    used = {row[k] for row in study.trained_rows(config) for k in ("pt_data", "ft_data")}

    def hub_sourced(section: str) -> list[str]:
        return [n for n, e in config[section].items() if e["source"]["type"] == "hub"]

    clips = [n for n, e in config["clip_models"].items() if e["source"]["type"] != "random_init"]
    vqa = [n for n, e in config["vqa_benchmarks"].items() if e["source"]["type"] == "vlmeval_tsv"]
    return {
        "clip": [CLIP.format(clip=name) for name in clips],
        "llm": [LLM.format(llm=name) for name in hub_sourced("llms")],
        "base": [BASE_VLM.format(base=name) for name in hub_sourced("base_vlms")],
        "hub": [HUB_VLM.format(hub=n) for n, vlm in config["hub_vlms"].items() if "repo" in vlm],
        "tsv": [VQA_TSV.format(vqa=name) for name in vqa],
        "train": [
            TRAIN_SHARDS.format(data=n)
            for n, data in config["train_data"].items()
            if "repo" in data["source"] and n in used
        ],
    }


def figure_inputs(config: dict) -> dict[str, str]:
    """What the figures read: the tables, the per-class details of the first trained row (else
    the first CLIP baseline) on the first fine-grained benchmark, and Figure 2's leaderboard CSV
    when its x-axis is the leaderboard's average."""
    rows = study.trained_rows(config) or config["ablations"]
    model = study.model_of_row(rows[0]) if rows else f"clip-{config['clip_eval']['models'][0]}"
    inputs = {
        name: table(f"{name}.csv")
        for name in ("ablations", "effects", "effects_summary", "table1", "models")
    }
    inputs["details"] = DETAILS.format(model=model, vlm_benchmark=next(iter(config["benchmarks"])))
    figure2 = config["report"].get("figure2") or {}
    if figure2.get("general") == "leaderboard":
        from fgvlm.report.aggregate import leaderboard_file

        inputs["leaderboard"] = leaderboard_file(figure2.get("leaderboard"))
    return inputs
