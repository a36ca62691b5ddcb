"""Packaging for promptcache: modular attention reuse (Prompt Cache) on transformers models."""

from setuptools import find_packages, setup

setup(
    name="promptcache",
    version="0.1.0",
    description="Modular attention reuse: PML schemas whose module KV caches are encoded once and spliced per request",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["promptcache", "promptcache.*", "eval", "eval.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "gguf>=0.10",
        "safetensors>=0.4",
        "lxml>=5.0",
        "tqdm>=4.60",
        "filelock>=3.12",
        "numpy>=1.26",
    ],
    extras_require={
        "redis": ["redis>=5.0", "hiredis>=2.0"],
        "eval": ["rouge-score>=0.1.2", "rapidfuzz>=3.0", "matplotlib>=3.7"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20"],
        "lora": ["peft>=0.21"],
        "test": ["pytest>=8.0", "hypothesis>=6.100", "openai>=1.0"],
    },
    entry_points={"console_scripts": ["promptcache=promptcache.cli:main"]},
)
