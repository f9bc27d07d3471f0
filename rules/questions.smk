# 5-way questions with CLIP hard negatives (paper §3.2), then WebDataset shards of them.


rule mine_questions:
    input:
        manifest="data/{benchmark}/manifest.parquet",
        classes="data/{benchmark}/classes.json",
        negatives="data/{benchmark}/negatives.json",
        clip=clip_dir(config["miner"]["clip"]),
    output:
        "results/questions/{benchmark}.parquet",
    log:
        "logs/mine_questions/{benchmark}.log",
    benchmark:
        "benchmarks/mine_questions/{benchmark}.tsv"
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("mine_questions")
    resources:
        **rule_resources("mine_questions"),
    params:
        miner=fc.miner_spec(config),
        batch_size=config["miner"].get("batch_size", 64),
        device=DEVICE,
    script:
        "../workflow/scripts/mine_questions.py"


rule shard_questions:
    input:
        questions="results/questions/{benchmark}.parquet",
        manifest="data/{benchmark}/manifest.parquet",
    output:
        directory("shards/questions/{benchmark}"),
    log:
        "logs/shard_questions/{benchmark}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("shard")
    resources:
        **rule_resources("shard"),
    params:
        samples_per_shard=config["shards"]["samples_per_shard"],
    script:
        "../workflow/scripts/shard_questions.py"


rule all_questions:
    input:
        expand("results/questions/{benchmark}.parquet", benchmark=BENCHMARKS),


rule all_shards:
    input:
        expand("shards/questions/{benchmark}", benchmark=BENCHMARKS),
