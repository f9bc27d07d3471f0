# Aggregation (paper Tables 1-4, §4.4), Section 3's model table, figures, the provenance table
# and the HTML report. Each job reads only its declared inputs: file maps go to the stage as params.
import fgvlm.provenance as fprov
import fgvlm.report.aggregate as fra

STUDY = fc.report_spec(config)
STUDY_FILES = fra.study_files(STUDY, paths.RESULTS)
MODELS_STUDY = fc.models_spec(config)
MODEL_FILES = fra.model_files(MODELS_STUDY, paths.RESULTS)
FIGURES = [*paths.FIGURE_NAMES, "confusion"]


rule aggregate_ablations:
    input:
        fra.flat_files(STUDY_FILES),
    output:
        ablations=report(
            paths.table("ablations.csv"),
            caption="../workflow/report/ablations.rst",
            category="Tables",
        ),
        effects=report(
            paths.table("effects.csv"),
            caption="../workflow/report/effects.rst",
            category="Tables",
        ),
        effects_summary=report(
            paths.table("effects_summary.csv"),
            caption="../workflow/report/effects.rst",
            category="Tables",
        ),
        table1=paths.table("table1.csv"),
        tables=expand(paths.table("table{n}.{ext}"), n=[1, 2, 3, 4], ext=["md", "tex"]),
    log:
        "logs/aggregate/ablations.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("aggregate")
    resources:
        **rule_resources("aggregate"),
    params:
        study=STUDY,
        files=STUDY_FILES,
    script:
        "../workflow/scripts/aggregate_ablations.py"


rule aggregate_models:
    input:
        fra.flat_files(MODEL_FILES),
    output:
        report(
            paths.table("models.csv"),
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
        study=MODELS_STUDY,
        files=MODEL_FILES,
    script:
        "../workflow/scripts/aggregate_models.py"


rule figures:
    input:
        **paths.figure_inputs(config),
    output:
        # one report entry per figure, each with its own caption
        **{
            name: report(
                f"{paths.FIGURES}/{name}.svg",
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
        report=STUDY["report"],
        repos=MODELS_STUDY["repos"],
        row_encoders=fc.row_encoders(config),
    script:
        "../workflow/scripts/figures.py"


rule provenance:
    input:
        **paths.provenance_inputs(config),
    output:
        report(
            paths.PROVENANCE,
            caption="../workflow/report/provenance.rst",
            category="Tables",
        ),
    log:
        "logs/aggregate/provenance.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("aggregate")
    resources:
        **rule_resources("aggregate"),
    params:
        spec=fc.canonical(fprov.provenance_spec(config)),
    script:
        "../workflow/scripts/provenance.py"
