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
package does not pull in TensorFlow.
"""
