"""kard_jax.tasks: seqio tasks that turn KARD data into training / evaluation examples.

The ONLY package that imports seqio / TensorFlow (except `sources`, which is pure Python).

  vocab              T5 SentencePiece vocabulary (load, or train offline: runs/build_vocab.gin)
  sources            records per variant (ft / rd / kard / kard_eval / reranker), pure Python
  preprocessors      records -> tf.data; reranker candidate tokenization / trimming
  registry           register_kard_tasks(dataset, ...), register_kard_mixture(...)
  feature_converters student (EncDec, pack=False) and reranker converters
  metrics            answer parsing postprocess + accuracy / unparsed counts
  cache              materialization: sharded TFRecords in seqio's cache layout, no Beam
  batch_iterator     SeqioBatchIterator: host-sharded, seeded, resumable numpy batches
  run                materialize run mode (runs/materialize.gin)

Submodules are imported explicitly (`from kard_jax.tasks import registry`), so importing this
package does not pull in TensorFlow. It does set TensorFlow's environment first (below).
"""
import glob as _glob
import os as _os
import sys as _sys


def _gpu_wanted() -> bool:
    """Whether this process may use a GPU: one exists and neither CUDA_VISIBLE_DEVICES nor
    JAX_PLATFORMS rules it out."""
    if not _glob.glob("/dev/nvidia[0-9]*"):
        return False
    if _os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    platforms = _os.environ.get("JAX_PLATFORMS", "").lower()
    return not platforms or "cuda" in platforms or "gpu" in platforms


def configure_tensorflow() -> None:
    """Environment for TensorFlow, set before it is first imported (it reads it once).

    TensorFlow only runs input pipelines here, never model code. Without a usable GPU it logs
    `E ... failed call to cuInit: ... CUDA error` at its first op (a false alarm on every stage of
    a CPU or TPU run), so its C++ log level is raised to hide it (TF_CPP_MIN_LOG_LEVEL=3; TF's
    Python errors are raised as exceptions all the same). With a GPU, TensorFlow is told to grow
    its GPU memory on demand instead of reserving what JAX needs. Settings already in the
    environment are kept, except TF_CPP_MIN_LOG_LEVEL=1, which `import jax` sets by default (set
    TF_CPP_MIN_LOG_LEVEL=0 to see every TensorFlow log line).
    """
    if "tensorflow" in _sys.modules:  # too late to change what TensorFlow reads at import
        return
    if _gpu_wanted():
        _os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    elif _os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") == "1":
        _os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


configure_tensorflow()
