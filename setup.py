"""scoreflow-jax: EDM diffusion whose denoiser is the exact gradient of a flow energy."""
from setuptools import find_packages, setup

TFDS = ["tensorflow-datasets>=4.9.10", "importlib_resources",
        "tensorflow-cpu>=2.16; platform_machine == 'x86_64' or platform_machine == 'AMD64'",
        "tensorflow>=2.16; platform_machine != 'x86_64' and platform_machine != 'AMD64'"]

setup(
    name="scoreflow-jax",
    version="0.1.0",
    description="EDM-style diffusion in JAX/Flax with an exact-score normalizing-flow energy network",
    packages=find_packages(include=["scoreflow_jax", "scoreflow_jax.*"]),
    python_requires=">=3.10",
    # Minimum versions are the ones this project was tested with.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "numpy>=2.0",
        "pillow>=10.0",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "scipy>=1.11",
    ],
    extras_require={
        # TensorFlow is only needed for the TFDS data source; it is imported lazily.
        # tensorflow-cpu has x86-64 wheels only; elsewhere (macOS arm64, Linux
        # aarch64) the tensorflow wheel is the CPU build.
        "tfds": TFDS,
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "scipy"] + TFDS,
    },
)
