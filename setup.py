"""Install minqr and build its compiled extension minqr._C against the torch you have.

    pip install --no-build-isolation -e ".[test]"

--no-build-isolation matters: an isolated build would download a torch of its own (several GB
with CUDA) and build the extension against it instead of the one you will run. Set
MINQR_NO_EXT=1 to install the pure-Python package only (the loss then runs its PyTorch
reference, with a warning).
"""
import glob
import os

from setuptools import find_packages, setup


def extension_modules():
    if os.environ.get("MINQR_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        raise SystemExit(
            "minqr: building the extension minqr._C needs torch installed first.\n"
            "  pip install torch==2.13.0   (or your own build), then\n"
            "  pip install --no-build-isolation -e .\n"
            "or set MINQR_NO_EXT=1 to install without the extension."
        )
    # csrc/: the schemas, checks and autograd (ops.cpp, autograd.cpp); csrc/cpu/, csrc/cuda/: one
    # backend each
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpp_sources:
        return [], {}
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("MINQR_NO_CUDA") != "1"
    )
    extension = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    # -fopenmp: at::parallel_for is header code that becomes an OpenMP loop only when the
    # extension itself is compiled with OpenMP; without it the CPU kernel silently runs serially.
    # -g0: Python's own flags ask for debug information, which for torch's templates doubles the
    # build's CPU time (94 s against 50 s on a 2-core CPU) and which only a debugger reads
    flags = {"cxx": ["-O3", "-fopenmp", "-g0"]}
    if use_cuda:
        # no --use_fast_math: the kernel is memory-bound, and its approximate exp/division would
        # eat into the 1e-5 float32 tolerance that the tests hold it to
        flags["nvcc"] = ["-O3", "-lineinfo"]
    ext = extension(
        name="minqr._C",
        sources=cpp_sources + (cuda_sources if use_cuda else []),
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="minqr",
    version="0.1.0",
    description="Small, fast, readable toolkit for RLHF reward models with quantile (distributional) heads",
    packages=find_packages(include=["minqr", "minqr.*", "minqr_cli", "minqr_cli.*"]),
    entry_points={"console_scripts": ["minqr=minqr_cli.commands:main"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # never pulls a new torch where 2.13.0 (or your own build) is installed
        "numpy",
        "tokenizers",
        "jinja2",  # chat templates (minqr/data/chat.py); torch brings it already
        "safetensors",
        "scipy",
        "click",  # minqr_cli only: the library never imports it
        "pyyaml",  # config files (--config FILE.yaml)
        "tqdm",
        "matplotlib",
        "huggingface_hub",
    ],
    extras_require={
        # Parquet and Arrow files and `hf:` data sets (minqr/data/tables.py); JSON lines need neither
        "data": ["pyarrow", "datasets"],
        "tensorboard": ["tensorboard"],  # --report-to tensorboard
        # minqr.adapters.trl's RewardFunction needs nothing more; its test runs TRL's GRPOTrainer
        "test": ["pytest", "pytest-benchmark", "transformers", "pyarrow", "datasets", "tensorboard", "trl"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
