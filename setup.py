from setuptools import find_packages, setup

setup(
    name="pijepa",
    version="0.1.0",
    description="Probabilistic I-JEPA pretraining at scale (FSDP, DeepSpeed, WebDataset)",
    # configs/ and ds_configs/ stay at the top level, where users know them, and ship inside the
    # wheel as the packages pijepa.configs and pijepa.ds_configs (read with importlib.resources).
    packages=[*find_packages(include=["pijepa", "pijepa.*"]), "pijepa.configs", "pijepa.ds_configs"],
    package_dir={"pijepa.configs": "configs", "pijepa.ds_configs": "ds_configs"},
    package_data={"pijepa.configs": ["*.yaml"], "pijepa.ds_configs": ["*.json", "*.md"],
                  "pijepa.commands.reproduce": ["templates/*.md"]},
    python_requires=">=3.10",
    # torch and torchvision are pinned: these releases install from the build machines' disk;
    # any other version downloads gigabytes.
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        # image decoding (torchvision 0.29 deprecates its own); 0.17 is built against torch 2.14
        "torchcodec==0.17.0",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "webdataset>=1.0",
        "matplotlib",
        # the files `pijepa export --format timm | hf` writes
        "safetensors",
    ],
    extras_require={
        "deepspeed": ["deepspeed==0.19.8"],
        "xformers": ["xformers"],
        # the libraries the exports are tested in (tests/e2e/test_interop.py), pinned: their names change
        "interop": ["timm==1.0.31", "transformers==5.25.0"],
        # ruff and mypy pinned: the test suite runs them, and a new release may add checks.
        # psutil: the crash tests and the soak watch processes.
        "dev": ["pytest", "ruff==0.17.6", "mypy==2.4.1", "types-PyYAML", "psutil"],
    },
    entry_points={"console_scripts": ["pijepa=pijepa.cli:main"]},
)
