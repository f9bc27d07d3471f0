from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.build_manifest(
    sm.params.spec,
    sm.output.manifest,
    sm.output.classes,
    sm.output.negatives,
    raw_dir=sm.params.raw_dir,
    world_dir=sm.input.get("world"),
)
