# Evaluation: CLIP zero-shot baselines (paper §3.3) read from the question shards.


rule eval_clip:
    input:
        **paths.clip_eval_inputs("{benchmark}", "{clip}"),
    output:
        predictions=paths.PREDICTIONS.format(
            model="clip-{clip}", vlm_benchmark="{benchmark}"
        ),
        metrics=paths.METRICS.format(model="clip-{clip}", vlm_benchmark="{benchmark}"),
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
        spec=lambda wc: fc.canonical(fc.clip_eval_spec(config, wc.clip)),
        metric=lambda wc: fc.metric_of(config, wc.benchmark),
        device=DEVICE,
    script:
        "../workflow/scripts/eval_clip.py"


rule all_clip:
    input:
        expand(
            paths.METRICS.format(model="clip-{clip}", vlm_benchmark="{benchmark}"),
            clip=config["clip_eval"]["models"],
            benchmark=BENCHMARKS,
        ),


rule eval_vlm:
    input:
        unpack(job_inputs(paths.eval_vlm_inputs, "model", "vlm_benchmark")),
    output:
        predictions=paths.PREDICTIONS,
        metrics=paths.METRICS,
        details=paths.DETAILS,
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
        spec=lambda wc: fc.canonical(
            fc.vlm_eval_spec(config, wc.model, wc.vlm_benchmark)
        ),
        parts_dir=lambda wc: paths.PARTS.format(
            model=wc.model, vlm_benchmark=wc.vlm_benchmark
        ),
        device=DEVICE,
    script:
        "../workflow/scripts/eval_vlm.py"


rule all_vlm_eval:
    input:
        expand(
            paths.METRICS,
            model=VLM_MODELS,
            vlm_benchmark=VLM_BENCHMARKS,
        ),
