# Model weights, fetched or materialized once into models/: every consumer loads local files.


rule fetch_clip:
    input:
        clip_source_inputs,
    output:
        directory("models/clip/{clip}"),
    log:
        "logs/fetch_clip/{clip}.log",
    conda:
        "../envs/fgvlm.yaml"
    resources:
        **rule_resources("fetch_model"),
    params:
        source=lambda wc: config["clip_models"][wc.clip]["source"],
    script:
        "../workflow/scripts/fetch_clip.py"
