# Model weights, fetched or materialized once into models/: every consumer loads local files.


rule fetch_clip:
    input:
        unpack(job_inputs(paths.clip_inputs, "clip")),
    output:
        directory(paths.CLIP),
    log:
        "logs/fetch_clip/{clip}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("fetch_model")
    resources:
        **rule_resources("fetch_model"),
    params:
        source=lambda wc: fc.canonical(config["clip_models"][wc.clip]["source"]),
    script:
        "../workflow/scripts/fetch_clip.py"


rule materialize_hub_vlm:
    input:
        unpack(job_inputs(paths.hub_vlm_inputs, "hub")),
    output:
        directory(paths.HUB_VLM),
    log:
        "logs/materialize_hub_vlm/{hub}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("fetch_model")
    resources:
        **rule_resources("fetch_model"),
    params:
        vlm=lambda wc: fc.canonical(fc.hub_vlm_spec(config, wc.hub)),
    script:
        "../workflow/scripts/materialize_hub_vlm.py"
