"""megapixel: train Image GPT at any scale. Install torch first (see install.sh), then this package."""

from setuptools import find_packages, setup

setup(
    name="megapixel",
    version="0.1.0",
    description="Train Image GPT (iGPT) from a CPU demo to iGPT-XL on a GPU cluster",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level folder kernels/ but install as `megapixel_kernels`: Hugging Face's
    # `kernels` package (a dependency of transformers 5) owns the import name `kernels`. The folder has no
    # __init__.py, so from the repository root `import kernels` still finds Hugging Face's package.
    packages=[*find_packages(include=["megapixel", "megapixel.*"]), "megapixel_kernels"],
    package_dir={"megapixel_kernels": "kernels"},
    install_requires=[
        # Any torch that is already installed satisfies this, so pip never swaps a CPU or cluster
        # build for a freshly downloaded CUDA one; install.sh installs torch before this package.
        "torch>=2.4",
        "deepspeed>=0.15",
        "triton>=3.0",
        "numpy",
        "webdataset>=0.2.90",
        "scikit-learn>=1.3",
        "scipy",
        "threadpoolctl",
        "pillow",
        "pyyaml",
        "tqdm",
        "safetensors",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={"test": ["pytest", "ruff", "transformers>=5"]},
    entry_points={"console_scripts": ["megapixel=megapixel.cli:main"]},
)
