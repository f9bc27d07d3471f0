# 5-way questions with CLIP hard negatives (paper §3.2), then WebDataset shards of them.


rule mine_questions:
    input:
        unpack(job_inputs(paths.question_inputs, "benchmark")),
    output:
        paths.QUESTIONS,
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
        miner=fc.canonical(fc.miner_spec(config)),
        device=DEVICE,
    script:
        "../workflow/scripts/mine_questions.py"


rule shard_questions:
    input:
        questions=paths.QUESTIONS,
        manifest=paths.MANIFEST,
    output:
        directory(paths.QUESTION_SHARDS),
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
        expand(paths.QUESTIONS, benchmark=BENCHMARKS),


rule all_shards:
    input:
        expand(paths.QUESTION_SHARDS, benchmark=BENCHMARKS),
