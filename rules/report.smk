# Aggregation (paper Tables 1-4, §4.4), Section 3's model table, figures, and the HTML report.


rule aggregate_ablations:
    input:
        metrics=ablation_metrics,
    output:
        ablations="results/tables/ablations.csv",
        effects="results/tables/effects.csv",
        effects_summary="results/tables/effects_summary.csv",
        tables=expand(
            "results/tables/table{n}.{ext}", n=[1, 2, 3, 4], ext=["md", "tex"]
        ),
        progression="results/tables/progression.csv",
    log:
        "logs/aggregate/ablations.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("aggregate")
    resources:
        **rule_resources("aggregate"),
    params:
        study=fc.report_spec(config),
    script:
        "../workflow/scripts/aggregate_ablations.py"


rule aggregate_models:
    input:
        metrics=model_metrics,
    output:
        "results/tables/models.csv",
    log:
        "logs/aggregate/models.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("aggregate")
    resources:
        **rule_resources("aggregate"),
    params:
        study=fc.models_spec(config),
    script:
        "../workflow/scripts/aggregate_models.py"


rule figures:
    input:
        ablations="results/tables/ablations.csv",
        progression="results/tables/progression.csv",
        models="results/tables/models.csv",
        details=confusion_details(),
    output:
        report(
            expand("results/figures/{name}.svg", name=FIGURES),
            caption="../workflow/report/figures.rst",
            category="Figures",
        ),
        expand("results/figures/{name}.html", name=FIGURES),
    log:
        "logs/aggregate/figures.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("aggregate")
    resources:
        **rule_resources("aggregate"),
    params:
        confusion_title=lambda wc, input: f"Per-class accuracy and confusions: {input.details}",
        row_encoders=fc.row_encoders(config),
    script:
        "../workflow/scripts/figures.py"
