import sys

from fgvlm import logs
from fgvlm.config import device_of
from fgvlm.training import launch

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
training = sm.config["training"]  # operational: not a params trigger
# One process here, or torchrun/accelerate on every GPU of the allocation (fgvlm.training.launch).
code = launch.run_or_launch(
    {
        "spec": sm.params.spec,
        "out_dir": sm.output[0],
        "state_dir": sm.params.state_dir,
        "data_dir": sm.input.data,
        "clip_dir": sm.input.get("clip"),
        "llm_dir": sm.input.get("llm"),
        "init_dir": sm.input.get("init"),
        "base_dir": sm.input.get("base"),
        "device": device_of({"device": sm.params.device}),
        "checkpoint_every": training["checkpoint_every"],
        "dataloader_workers": training["dataloader_workers"],
        "log_every": training["log_every"],
        "peak_tflops": training["peak_tflops"],
    },
    state_dir=sm.params.state_dir,
    accelerate_config=training.get("accelerate_config"),
)
sys.exit(code)
