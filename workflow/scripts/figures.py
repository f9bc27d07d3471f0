from pathlib import Path

from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.make_figures(
    Path(sm.input.ablations).parent,
    sm.input.models,
    sm.input.details,
    Path(sm.output.figure2).parent,
    confusion_title=sm.params.confusion_title,
    row_encoders=sm.params.row_encoders,
)
