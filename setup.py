from setuptools import setup

setup(
    name="fused-concept",
    version="0.1.0",
    description="Fused LM-head concept loss (Learning Concepts, Not Tokens) without materialised logits",
    python_requires=">=3.9",
    packages=["fused_concept", "fused_concept.kernels"],
    package_dir={"fused_concept": "fused_concept", "fused_concept.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # the tested versions: 3.6.0 (the GPU image's) and 3.8.0 (pinned in requirements.txt); see
        # tests/test_triton_compile.py
        "triton": ["triton>=3.6.0,<=3.8.0,!=3.7.*"],
        "hf": ["transformers>=4.45", "gguf>=0.10", "peft>=0.12", "tqdm", "matplotlib"],
        "bench": ["pytest-benchmark", "psutil", "matplotlib"],
    },
    entry_points={"console_scripts": ["fused-concept=fused_concept.__main__:main"]},
)
