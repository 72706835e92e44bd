"""tfquant: learned low-bit quantizers for Keras 3 and exact integer TFLite export."""

from setuptools import find_packages, setup

setup(
    name="tfquant",
    version="0.1.0",
    description=(
        "Learned quantizers (QIL, Quantization Networks, DQ, CPQ, LSQ, PACT) as Keras 3 "
        "layers, with exact INT4/INT8 TFLite export"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tfquant", "tfquant.*", "train", "train.*", "export",
                                    "export.*", "benchmarks", "benchmarks.*"]),
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.0",
        "numpy",
        "absl-py",
        "tensorflow-datasets",
        "scikit-learn",
    ],
    extras_require={
        "lite": ["ai-edge-litert"],
        "test": ["pytest", "pytest-xdist", "hypothesis", "ruff", "ai-edge-litert"],
        "plots": ["matplotlib"],
        "baseline": ["tf-keras>=2.21,<2.22", "tensorflow-model-optimization"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
