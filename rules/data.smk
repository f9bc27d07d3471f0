# Benchmarks: synthetic worlds, downloads and normalized manifests.


rule synthesize_world:
    output:
        directory("data/synthetic/{world}"),
    log:
        "logs/synthesize_world/{world}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("synthesize")
    resources:
        **rule_resources("synthesize"),
    params:
        world=lambda wc: config["synthetic_worlds"][wc.world],
    script:
        "../workflow/scripts/synthesize_world.py"


rule build_manifest:
    input:
        unpack(manifest_inputs),
    output:
        manifest="data/{benchmark}/manifest.parquet",
        classes="data/{benchmark}/classes.json",
        negatives="data/{benchmark}/negatives.json",
    log:
        "logs/build_manifest/{benchmark}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("download")
    resources:
        **rule_resources("download"),
    params:
        spec=lambda wc: fc.benchmark_spec(config, wc.benchmark),
        raw_dir=lambda wc: f"data/raw/{wc.benchmark}",
    script:
        "../workflow/scripts/build_manifest.py"


rule vqa_benchmark:
    output:
        "data/vqa/{vqa}.tsv",
    log:
        "logs/vqa_benchmark/{vqa}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("download")
    resources:
        **rule_resources("download"),
    params:
        source=lambda wc: config["vqa_benchmarks"][wc.vqa]["source"],
    script:
        "../workflow/scripts/vqa_benchmark.py"


rule all_manifests:
    input:
        expand("data/{benchmark}/manifest.parquet", benchmark=BENCHMARKS),
        expand("data/vqa/{vqa}.tsv", vqa=VQA_BENCHMARKS),
