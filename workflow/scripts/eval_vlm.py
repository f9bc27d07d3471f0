from fgvlm import logs, stages
from fgvlm.config import device_of

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
evaluation = sm.config["evaluation"]  # batch and part sizes, loader workers do not change answers
stages.eval_vlm(
    sm.params.spec,
    **dict(sm.input.items()),
    **dict(sm.output.items()),
    parts_dir=sm.params.parts_dir,
    batch_size=evaluation["batch_size"],
    part_size=evaluation["part_size"],
    loader_workers=evaluation["loader_workers"],
    device=device_of({"device": sm.params.device}),
)
