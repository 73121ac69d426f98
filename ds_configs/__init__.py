"""DeepSpeed JSON configs shipped with pijepa (the package `pijepa.ds_configs`, mapped in setup.py):
`dist.deepspeed_config` takes a path or a packaged name such as `zero2_bf16`."""
