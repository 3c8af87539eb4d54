from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="reasonedit",
    version="0.1.0",
    description="Reasoning-enhanced image editing: a Qwen2.5-VL reasoner and an MMDiT generator, "
                "trained in three stages and run as think -> edit -> reflect.",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["reasonedit", "reasonedit.*"]),
    # the presets, experiments, sweeps and DeepSpeed JSONs (configs/ and launch/deepspeed/ in a checkout link here)
    package_data={"reasonedit": ["configs/*/*.yaml", "configs/deepspeed/*.json"]},
    install_requires=[
        # torch is installed first by the Makefile (torch==2.13.0, the CPU wheel on disk here);
        # a range that it satisfies keeps pip from pulling another build.
        "torch>=2.6,<2.14",
        "transformers>=5.23,<6",
        "tokenizers>=0.22,<0.24",
        "diffusers==0.42.1",
        "peft==0.21.2",
        "deepspeed==0.19.8",
        "webdataset==1.0.2",
        "wandb==0.31.0",
        "omegaconf==2.4.0",
        "tensorboard==2.21.0",
        # the edit service and the HTTP clients (editors, thinkers, judges)
        "fastapi==0.163.2",
        "uvicorn==0.54.0",
        "python-multipart==0.0.34",
        "httpx==0.28.1",
        # eval reports
        "matplotlib==3.11.2",
        "pyyaml>=6",
        "safetensors>=0.6",
        "pillow>=11",
        "pyarrow==26.0.1",  # GEdit-Bench's parquet files
        "numpy>=1.26",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.7"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5"],  # make test runs the suite on TEST_WORKERS processes
    },
    entry_points={"console_scripts": ["reasonedit=reasonedit.cli:main"]},
)
