# Aggregation (paper Tables 1-4, §4.4), Section 3's model table, figures, and the HTML report.
# Each job reads only its declared inputs: the file maps go to the stage as params.
import fgvlm.report.aggregate as fra

STUDY = fc.report_spec(config)
STUDY_FILES = fra.study_files(STUDY, "results")
MODELS_STUDY = fc.models_spec(config)
MODEL_FILES = fra.model_files(MODELS_STUDY, "results")
FIGURE2 = STUDY["report"].get("figure2") or {}
LEADERBOARD = (
    {"leaderboard": fra.leaderboard_file(FIGURE2.get("leaderboard"))}
    if FIGURE2.get("general") == "leaderboard"
    else {}
)


rule aggregate_ablations:
    input:
        fra.flat_files(STUDY_FILES),
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
        table1="results/tables/table1.csv",
        tables=expand(
            "results/tables/table{n}.{ext}", n=[1, 2, 3, 4], ext=["md", "tex"]
        ),
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
        study=MODELS_STUDY,
        files=MODEL_FILES,
    script:
        "../workflow/scripts/aggregate_models.py"


rule figures:
    input:
        ablations="results/tables/ablations.csv",
        effects="results/tables/effects.csv",
        effects_summary="results/tables/effects_summary.csv",
        table1="results/tables/table1.csv",
        models="results/tables/models.csv",
        details=confusion_details(),
        **LEADERBOARD,
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
        report=STUDY["report"],
        repos=MODELS_STUDY["repos"],
        row_encoders=fc.row_encoders(config),
    script:
        "../workflow/scripts/figures.py"
