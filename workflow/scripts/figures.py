from pathlib import Path

from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.make_figures(
    {name: path for name, path in sm.input.items()},
    Path(sm.output.figure2).parent,
    report=sm.params.report,
    repos=sm.params.repos,
    row_encoders=sm.params.row_encoders,
    confusion_title=sm.params.confusion_title,
)
