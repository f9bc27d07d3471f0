# fgvlm: the fine-grained visual knowledge study as a DAG (docs/ARCHITECTURE.md).
# The paper's study is config/config.yaml; the embedded demo is `--profile profiles/demo`
# (config/demo.yaml). No `configfile:` directive: it would merge the paper's rows into the demo.


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/questions.smk"
include: "rules/download.smk"
include: "rules/train.smk"
include: "rules/eval.smk"
include: "rules/report.smk"


onstart:
    print(
        f"fgvlm: {len(BENCHMARKS)} fine-grained + {len(VQA_BENCHMARKS)} VQA benchmarks, "
        f"{len(TRAINED_RUNS)} trained ablations, {len(HUB_VLMS)} hub VLMs, device {DEVICE}"
    )


rule all_ablations:
    input:
        paths.table("ablations.csv"),


rule all_models:
    input:
        paths.table("models.csv"),


rule all:
    default_target: True
    input:
        rules.all_ablations.input,
        rules.all_models.input,
        rules.figures.output,
        rules.provenance.output,
        rules.all_manifests.input,
        rules.all_clip.input,
