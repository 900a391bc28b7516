from setuptools import setup

# Triton has Linux wheels only; elsewhere the layers run their plain-torch paths.  A marker, not a test
# of the building machine's platform: a wheel built on Linux must not require triton on macOS.
install_requires = ["torch>=2.4", "numpy>=1.24", "tensorly>=0.8", "triton>=3.0; sys_platform == 'linux'"]

setup(
    name="dynrank",
    version="0.1.0",
    description="Dynamic-rank training: low-rank, full and adapter weight forms with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The top-level kernels/ folder is installed as dynrank.kernels: a top-level
    # package named "kernels" would shadow an existing PyPI package.
    packages=["dynrank", "dynrank.train", "dynrank.kernels"],
    package_dir={"dynrank": "dynrank", "dynrank.kernels": "kernels"},
    install_requires=install_requires,
    extras_require={
        # transformers, accelerate (its Trainer's): the tests of dynrank on transformers models and of
        # dynrank.hf (tests/test_transformers.py, nothing downloaded)
        "dev": ["pytest>=7", "pytest-benchmark>=4", "transformers>=4.40", "accelerate>=0.26"],
        "plots": ["matplotlib>=3.5"],
        "vision": ["pillow>=9"],
    },
    entry_points={"console_scripts": ["dynrank-train=dynrank.train.cli:main"]},
)
