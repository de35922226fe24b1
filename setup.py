from setuptools import find_packages, setup

setup(
    name="fused-concept",
    version="0.1.0",
    description="Fused LM-head concept loss (Learning Concepts, Not Tokens) without materialised logits",
    # the ranges tested: Python 3.11 / torch 2.13.0 (CPU, CI) and Python 3.12 / torch 2.11.0+cu130 (one H200)
    python_requires=">=3.11",
    # kernels/ (top-level in the repository) installs as fused_concept.kernels: no top-level `kernels` module
    packages=find_packages(include=["fused_concept", "fused_concept.*"]) + ["fused_concept.kernels"],
    package_dir={"fused_concept": "fused_concept", "fused_concept.kernels": "kernels"},
    # the training recipes are TOML files read at run time (fused_concept/training/recipes/*.toml)
    package_data={"fused_concept.training.recipes": ["*.toml"]},
    install_requires=["torch>=2.11,<2.14", "numpy"],
    extras_require={
        # the tested versions: 3.6.0 (the GPU image's) and 3.8.0 (pinned in requirements.txt); see
        # tests/backends/test_triton_compile.py
        "triton": ["triton>=3.6.0,<=3.8.0,!=3.7.*"],
        # tested: transformers 5.23.0, gguf 0.19.0, peft 0.21.2 (requirements.txt); 5.17 is the GPU image's (no hf test ran there)
        "hf": ["transformers>=5.17,<6", "gguf>=0.19", "peft>=0.21", "tqdm", "matplotlib"],
        "bench": ["pytest-benchmark", "psutil", "matplotlib"],
    },
    entry_points={"console_scripts": ["fused-concept=fused_concept.__main__:main"]},
)
