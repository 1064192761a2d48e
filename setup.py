from setuptools import find_packages, setup

setup(
    name="sparse-attn",
    version="0.1.0",
    description="Block-sparse attention for DeepSpeed training: the maintained successor of "
    "DeepSpeed Sparse Attention (PyTorch 2.x, Triton 3.x, DeepSpeed 0.19+).",
    python_requires=">=3.10",
    packages=find_packages(include=["sparse_attn", "sparse_attn.*", "launcher", "launcher.*"]),
    install_requires=["torch>=2.4", "pydantic>=2.5", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "deepspeed": ["deepspeed>=0.19", "tensorboard"],
        "hf": ["transformers>=5,<6", "tokenizers", "accelerate>=1.1"],
        "viz": ["matplotlib"],
        "test": ["pytest>=8", "triton>=3.2", "matplotlib", "jsonschema>=4"],
        "dev": ["pytest>=8", "triton>=3.2", "matplotlib", "jsonschema>=4", "transformers>=5,<6",
                "tokenizers", "accelerate>=1.1", "deepspeed>=0.19", "tensorboard"],
    },
    entry_points={"console_scripts": ["sparse-attn=sparse_attn.__main__:main"]},
)
