from pathlib import Path

from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log)
stages.make_figures(
    Path(sm.input.ablations).parent,
    sm.input.models,
    sm.input.details,
    Path(sm.output[0]).parent,
    confusion_title=sm.params.confusion_title,
)
