# Training (paper §4, Appendix C): base models, training shards, pretraining, finetuning.
# Rows with equal pretraining specs share one pretraining job (fgvlm.config.pretrain_jobs).


rule materialize_llm:
    input:
        llm_inputs,
    output:
        directory("models/llm/{llm}"),
    log:
        "logs/materialize_llm/{llm}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("fetch_model")
    resources:
        **rule_resources("fetch_model"),
    params:
        source=lambda wc: config["llms"][wc.llm]["source"],
    script:
        "../workflow/scripts/materialize_llm.py"


rule materialize_base_vlm:
    input:
        unpack(base_inputs),
    output:
        directory("models/base/{base}"),
    log:
        "logs/materialize_base_vlm/{base}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("fetch_model")
    resources:
        **rule_resources("fetch_model"),
    params:
        source=lambda wc: config["base_vlms"][wc.base]["source"],
    script:
        "../workflow/scripts/materialize_base_vlm.py"


rule shard_train_data:
    input:
        train_data_inputs,
    output:
        directory("shards/train/{data}"),
    log:
        "logs/shard_train_data/{data}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("download")
    resources:
        **rule_resources("download"),
    params:
        source=lambda wc: config["train_data"][wc.data]["source"],
        samples_per_shard=(config.get("training") or {}).get("samples_per_shard", 10000),
    script:
        "../workflow/scripts/shard_train_data.py"


rule pretrain:
    input:
        unpack(pretrain_inputs),
    output:
        directory("runs/{pretrain_key}/pretrain"),
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
        spec=lambda wc: PRETRAIN_JOBS[wc.pretrain_key],
        state_dir=lambda wc: f"runs/{wc.pretrain_key}/pretrain.state",
        device=DEVICE,
    script:
        "../workflow/scripts/train.py"


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        directory("runs/{run}/finetune"),
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
        spec=lambda wc: fc.finetune_spec(config, ROWS[wc.run]),
        state_dir=lambda wc: f"runs/{wc.run}/finetune.state",
        device=DEVICE,
    script:
        "../workflow/scripts/train.py"


rule all_training:
    input:
        expand("runs/{run}/finetune", run=TRAINED_RUNS),
