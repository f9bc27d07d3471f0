# Training (paper §4, Appendix C): base models, training shards, pretraining, finetuning.
# Rows with equal pretraining specs share one pretraining job (fgvlm.config.pretrain_jobs).


rule materialize_llm:
    input:
        unpack(job_inputs(paths.llm_inputs, "llm")),
    output:
        directory(paths.LLM),
    log:
        "logs/materialize_llm/{llm}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("fetch_model")
    resources:
        **rule_resources("fetch_model"),
    params:
        source=lambda wc: fc.canonical(config["llms"][wc.llm]["source"]),
    script:
        "../workflow/scripts/materialize_llm.py"


rule materialize_base_vlm:
    input:
        unpack(job_inputs(paths.base_vlm_inputs, "base")),
    output:
        directory(paths.BASE_VLM),
    log:
        "logs/materialize_base_vlm/{base}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("fetch_model")
    resources:
        **rule_resources("fetch_model"),
    params:
        source=lambda wc: fc.canonical(config["base_vlms"][wc.base]["source"]),
    script:
        "../workflow/scripts/materialize_base_vlm.py"


rule shard_train_data:
    input:
        unpack(job_inputs(paths.train_data_inputs, "data")),
    output:
        directory(paths.TRAIN_SHARDS),
    log:
        "logs/shard_train_data/{data}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("download")
    resources:
        **rule_resources("download"),
    params:
        source=lambda wc: fc.canonical(config["train_data"][wc.data]["source"]),
        samples_per_shard=config["training"]["samples_per_shard"],
        raw_dir=lambda wc: paths.TRAIN_RAW.format(data=wc.data),
    script:
        "../workflow/scripts/shard_train_data.py"


rule pretrain:
    input:
        unpack(job_inputs(paths.pretrain_inputs, "pretrain_key")),
    output:
        directory(paths.PRETRAIN),
    log:
        "logs/pretrain/{pretrain_key}.log",
    benchmark:
        "benchmarks/pretrain/{pretrain_key}.tsv"
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("pretrain")
    resources:
        **rule_resources("pretrain"),
    params:
        spec=lambda wc: fc.canonical(PRETRAIN_JOBS[wc.pretrain_key]),
        state_dir=lambda wc: paths.state_dir(
            paths.PRETRAIN.format(pretrain_key=wc.pretrain_key)
        ),
        device=DEVICE,
    script:
        "../workflow/scripts/train.py"


rule finetune:
    input:
        unpack(job_inputs(paths.finetune_inputs, "run")),
    output:
        directory(paths.FINETUNE),
    log:
        "logs/finetune/{run}.log",
    benchmark:
        "benchmarks/finetune/{run}.tsv"
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("finetune")
    resources:
        **rule_resources("finetune"),
    params:
        spec=lambda wc: fc.canonical(fc.finetune_spec(config, ROWS[wc.run])),
        state_dir=lambda wc: paths.state_dir(paths.FINETUNE.format(run=wc.run)),
        device=DEVICE,
    script:
        "../workflow/scripts/train.py"


rule all_training:
    input:
        expand(paths.FINETUNE, run=TRAINED_RUNS),
