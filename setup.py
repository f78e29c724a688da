from setuptools import find_packages, setup

setup(
    name="soup-megatron",
    version="0.1.0",
    description="SOUP (token-level single-sample mix-policy RL) post-training on megatron-core and SGLang",
    python_requires=">=3.10",
    packages=find_packages(include=["soup_megatron", "soup_megatron.*"]),
    # not Python packages of ours, but files the installed package needs: the sbatch templates, and the
    # modules every SGLang server this project starts gets on its PYTHONPATH (rollout/sglang_pythonpath/)
    package_data={"soup_megatron.cluster": ["templates/*.j2"],
                  "soup_megatron.rollout": ["sglang_pythonpath/*.py", "sglang_pythonpath/*.md",
                                            "sglang_pythonpath/sgl_kernel/*.py"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.57",
        "tokenizers>=0.21",
        "omegaconf>=2.4",  # Literal-typed config fields
        "math-verify>=0.8",
        "safetensors>=0.4",
        "tqdm",
        "rich",
        "matplotlib",
        "tensorboard",
        "pyarrow",
        "jinja2",  # sbatch templates (soup-megatron launch)
    ],
    extras_require={
        "megatron": ["megatron-core>=0.13", "psutil"],  # psutil: the torch_dist checkpoint writer
        "sglang": ["sglang>=0.5", "requests"],
        "launch": ["nemo-run>=0.5", "leptonai<0.47"],
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],  # prepare: model.source=gguf_wheel (requirements-gguf.txt pins)
        "wandb": ["wandb>=0.19"],  # trainer.wandb=offline|online (requirements-cpu.txt pins it for the tests)
        "dev": ["pytest>=8", "pytest-timeout", "ruff"],
    },
    entry_points={"console_scripts": ["soup-megatron=soup_megatron.cli:main"]},
)
