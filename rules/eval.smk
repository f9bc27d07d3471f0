# Evaluation: CLIP zero-shot baselines (paper §3.3) read from the question shards.


rule eval_clip:
    input:
        shards="shards/questions/{benchmark}",
        classes="data/{benchmark}/classes.json",
        clip="models/clip/{clip}",
    output:
        predictions="results/predictions/clip-{clip}/{benchmark}.parquet",
        metrics="results/metrics/clip-{clip}/{benchmark}.json",
    log:
        "logs/eval_clip/{clip}/{benchmark}.log",
    benchmark:
        "benchmarks/eval_clip/{clip}/{benchmark}.tsv"
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("eval_clip")
    resources:
        **rule_resources("eval_clip"),
    params:
        spec=lambda wc: fc.clip_eval_spec(config, wc.clip),
        metric=lambda wc: fc.metric_of(config, wc.benchmark),
        batch_size=config["clip_eval"].get("batch_size", 64),
        device=DEVICE,
    script:
        "../workflow/scripts/eval_clip.py"


rule all_clip:
    input:
        expand(
            "results/metrics/clip-{clip}/{benchmark}.json",
            clip=config["clip_eval"]["models"],
            benchmark=BENCHMARKS,
        ),


rule eval_vlm:
    input:
        unpack(eval_vlm_inputs),
    output:
        predictions="results/predictions/{model}/{vlm_benchmark}.parquet",
        metrics="results/metrics/{model}/{vlm_benchmark}.json",
        details="results/metrics/{model}/{vlm_benchmark}.details.json",
    log:
        "logs/eval_vlm/{model}/{vlm_benchmark}.log",
    benchmark:
        "benchmarks/eval_vlm/{model}/{vlm_benchmark}.tsv"
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("eval_vlm")
    resources:
        **rule_resources("eval_vlm"),
    params:
        spec=lambda wc: fc.vlm_eval_spec(config, wc.model, wc.vlm_benchmark),
        parts_dir=lambda wc: f"results/parts/{wc.model}/{wc.vlm_benchmark}",
        device=DEVICE,
    script:
        "../workflow/scripts/eval_vlm.py"


rule all_vlm_eval:
    input:
        expand(
            "results/metrics/{model}/{vlm_benchmark}.json",
            model=VLM_MODELS,
            vlm_benchmark=VLM_BENCHMARKS,
        ),
