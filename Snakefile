# fgvlm: the fine-grained visual knowledge study as a DAG (docs/ARCHITECTURE.md).
# The paper's study is config/config.yaml; the embedded demo is `--profile profiles/demo`
# (config/demo.yaml). No `configfile:` directive: it would merge the paper's rows into the demo.


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/questions.smk"
include: "rules/train.smk"
include: "rules/eval.smk"


onstart:
    print(
        f"fgvlm: {len(BENCHMARKS)} benchmarks, {len(CLIP_MODELS)} CLIP models, device {DEVICE}"
    )


rule all:
    default_target: True
    input:
        rules.all_manifests.input,
        rules.all_questions.input,
        rules.all_shards.input,
        rules.all_clip.input,
