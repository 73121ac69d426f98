from setuptools import find_packages, setup

setup(
    name="pijepa",
    version="0.1.0",
    description="Probabilistic I-JEPA pretraining at scale (FSDP, DeepSpeed, WebDataset)",
    packages=find_packages(include=["pijepa", "pijepa.*"]),
    python_requires=">=3.10",
    # torch and torchvision are pinned: these releases install from the build machines' disk;
    # any other version downloads gigabytes.
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "webdataset>=1.0",
        "matplotlib",
    ],
    extras_require={
        "deepspeed": ["deepspeed==0.19.8"],
        "xformers": ["xformers"],
        "dev": ["pytest", "ruff", "psutil"],  # psutil: the crash tests and the soak watch processes
    },
    entry_points={"console_scripts": ["pijepa=pijepa.cli:main"]},
)
