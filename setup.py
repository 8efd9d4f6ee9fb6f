"""fedrec: privacy-first recommendation models, central and federated training."""

from setuptools import find_packages, setup

setup(
    name="fedrec",
    version="0.1.0",
    description="Privacy-first framework for recommendation models: DLRM, MF, DP-SGD, encrypted FedAvg",
    python_requires=">=3.11",
    packages=find_packages(include=["fedrec", "fedrec.*", "privacy", "privacy.*"]),
    install_requires=[
        "torch==2.13.0",
        "numpy>=1.24,<2",
        "scipy>=1.10",
        "pyyaml>=6",
        "tensorboard>=2.14",
        # tensorboard 2.20's entry point imports pkg_resources, removed in setuptools 82.
        "setuptools<82",
        "tqdm>=4.60",
        "opacus==1.6.0",
        "tenseal==0.3.18",
        "mpi4py>=4.0",
        "mpich>=4.2",
        "matplotlib>=3.7",
        "syft==0.9.5",
        # Sealed (AES-GCM) global model in deployment; pulled in by syft too, used directly here.
        "cryptography",
        # syft 0.9.5's kr8s imports sniffio without declaring it.
        "sniffio",
    ],
    # `fedrec train|train-dp|train-fl|deploy|report|audit|preprocess` (also `python -m fedrec`).
    entry_points={"console_scripts": ["fedrec=fedrec.__main__:main"]},
    extras_require={
        "dev": ["pytest", "hypothesis", "ruff", "mypy", "pandas", "psutil"],
        "bench": ["pandas", "scikit-surprise"],
    },
)
