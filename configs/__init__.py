"""Run configs shipped with pijepa (the package `pijepa.configs`, mapped in setup.py): pass a bare
name such as `--config cpu_default` or a path."""
