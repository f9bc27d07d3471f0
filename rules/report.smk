# Aggregation (paper Tables 1-4, §4.4), Section 3's model table, figures, and the HTML report.


rule aggregate_ablations:
    input:
        metrics=ablation_metrics,
    output:
        ablations=report(
            "results/tables/ablations.csv",
            caption="../workflow/report/ablations.rst",
            category="Tables",
        ),
        effects=report(
            "results/tables/effects.csv",
            caption="../workflow/report/effects.rst",
            category="Tables",
        ),
        effects_summary=report(
            "results/tables/effects_summary.csv",
            caption="../workflow/report/effects.rst",
            category="Tables",
        ),
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
        report(
            "results/tables/models.csv",
            caption="../workflow/report/models.rst",
            category="Tables",
        ),
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
        # one report entry per figure, each with its own caption
        **{
            name: report(
                f"results/figures/{name}.svg",
                caption=f"../workflow/report/{name}.rst",
                category="Figures",
            )
            for name in FIGURES
        },
        html=expand("results/figures/{name}.html", name=FIGURES),
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
