from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.build_manifest(
    sm.params.spec, **dict(sm.input.items()), **dict(sm.output.items()), raw_dir=sm.params.raw_dir
)
