"""tfvae: the Variational Auto-Encoder of Kingma & Welling (2013) on Keras 3, TF and TFP."""

import pathlib
import re

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "tfvae" / "__init__.py").read_text())[1]

setup(
    name="tfvae",
    version=version,
    description="Variational Auto-Encoders (Kingma & Welling) on Keras 3, TensorFlow and TFP,"
                " exported for TensorFlow Serving.",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tfvae", "tfvae.*"]),
    scripts=["bin/train", "bin/evaluate", "bin/sample", "bin/reproduce", "bin/export"],
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.0",
        "tensorflow-probability[tf]>=0.24",
        "tensorboard",
        "numpy",
        "absl-py",
        "scipy",
        "pillow",
        "matplotlib",
        "tensorflow-serving-api>=2.21,<2.22",  # warm-up requests written with the exports
    ],
    extras_require={
        "test": ["pytest", "ruff", "hypothesis", "tensorflow-datasets"],
    },
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
