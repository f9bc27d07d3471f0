from pathlib import Path

from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.aggregate_ablations(sm.params.study, sm.params.files, Path(sm.output.ablations).parent)
