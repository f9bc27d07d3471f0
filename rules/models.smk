# Model weights, fetched or materialized once into models/: every consumer loads local files.


rule fetch_clip:
    input:
        unpack(clip_source_inputs),
    output:
        directory("models/clip/{clip}"),
    log:
        "logs/fetch_clip/{clip}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("fetch_model")
    resources:
        **rule_resources("fetch_model"),
    params:
        source=lambda wc: config["clip_models"][wc.clip]["source"],
    script:
        "../workflow/scripts/fetch_clip.py"


rule materialize_hub_vlm:
    input:
        unpack(hub_vlm_inputs),
    output:
        directory("models/hub/{hub}"),
    log:
        "logs/materialize_hub_vlm/{hub}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("fetch_model")
    resources:
        **rule_resources("fetch_model"),
    params:
        vlm=lambda wc: config["hub_vlms"][wc.hub],
    script:
        "../workflow/scripts/materialize_hub_vlm.py"
