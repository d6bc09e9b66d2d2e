"""megatron-dcod: distribution-corrected offline distillation of reasoning traces.

torch, megatron-core and transformer-engine are deliberately not install requirements: a cluster
container (NGC PyTorch) brings its own builds and installing this package must never replace them.
On a bare machine `make setup` installs them (see the Makefile and README).
"""

from setuptools import find_packages, setup

setup(
    name="megatron-dcod",
    version="0.1.0",
    description="Distribution-corrected offline distillation of reasoning traces on Megatron-Core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_dcod", "megatron_dcod.*"]),
    install_requires=[
        "numpy",
        "packaging>=24.2",
        "psutil",
        "einops",
        "transformers>=4.56",
        "tokenizers",
        "safetensors",
        "sentencepiece",
        "datasets",
        "pyarrow",
        "orjson",
        "tqdm",
        "typing_extensions",
        "tensorboard",  # --tensorboard-dir (Megatron writes through torch.utils.tensorboard)
        "math-verify==0.9.0",  # tools/eval_math.py grading: pinned, reported with every score
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        # python -m megatron_dcod.train_hf; its ops build on first use (make setup: DS_BUILD_OPS=0)
        "deepspeed": ["deepspeed>=0.16"],
        "wandb": ["wandb"],
        "test": ["pytest", "pytest-timeout", "black", "accelerate"],  # accelerate: GGUF models
        "examples": ["matplotlib"],  # the quickstart's plot
    },
)
