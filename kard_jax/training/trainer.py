"""The training loop: one jitted, sharded, donating train step; checkpoints; metrics; preemption.

`Trainer` owns the compiled steps for a (model, optimizer, mesh, rules) combination; `train()`
is the run mode gin binds (`kard_jax.main.execute.job = @trainer.train`). The trainer never
looks at feature names: the model's `loss_fn` consumes the batch, and `aux[LOSS_DENOMINATOR]`
tells how to weight microbatches so that accumulation equals one big batch.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from kard_jax import cpu_runtime
from kard_jax.errors import InputError
from kard_jax.models.base import LOSS_DENOMINATOR, BaseModel
from kard_jax.training import checkpoints, data_iterator, metrics, optimizers, partitioning
from kard_jax.training.train_state import StateInitializer, TrainState

PyTree = Any
Batch = Mapping[str, np.ndarray]


def _weighted_aux(aux: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(denominator, aux without it): the weight of this batch's means (1 if the model gives none)."""
    aux = dict(aux)
    denom = jnp.asarray(aux.pop(LOSS_DENOMINATOR, 1.0), jnp.float32)
    return denom, aux


def _divide(x, d):
    return jnp.where(d > 0, x / jnp.where(d > 0, d, 1.0), 0.0)


class Trainer:
    """Compiled train / eval steps of a model under a mesh and logical-axis rules."""

    def __init__(
        self,
        model: BaseModel,
        optimizer: optimizers.Optimizer,
        *,
        mesh: jax.sharding.Mesh,
        logical_axis_rules: partitioning.LogicalAxisRules,
        microbatches: int = 1,
        seed: int = 0,
    ):
        if microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {microbatches}")
        self.model = model
        self.optimizer = optimizer
        self.mesh = mesh
        self.rules = partitioning.rules_for_mesh(logical_axis_rules, mesh)
        self.microbatches = microbatches
        init_rng, self.dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
        self.init_rng = init_rng
        self._initializer: StateInitializer | None = None
        self._compiled_train = None
        self._compiled_eval = None
        self._batch_shardings: dict[str, NamedSharding] | None = None
        self.compile_seconds: float | None = None
        self.memory_analysis: Any = None

    # ----- state -----
    def initializer(self, input_shapes: Mapping[str, tuple[int, ...]]) -> StateInitializer:
        if self._initializer is None:
            shapes = {k: (1,) + tuple(v[1:]) for k, v in input_shapes.items()}
            self._initializer = StateInitializer(
                lambda rng: self.model.get_initial_variables(rng, shapes)["params"],
                self.optimizer.tx, self.mesh, self.rules,
            )
        return self._initializer

    def init_state(self, input_shapes: Mapping[str, tuple[int, ...]]) -> TrainState:
        return self.initializer(input_shapes).from_scratch(self.init_rng)

    @contextlib.contextmanager
    def _context(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    # ----- batches -----
    def batch_shardings(self, batch: Batch) -> dict[str, NamedSharding]:
        return {k: partitioning.batch_sharding(self.mesh, self.rules, np.ndim(v)) for k, v in batch.items()}

    def global_batch(self, local_batch: Batch) -> dict[str, jax.Array]:
        """This host's rows -> global arrays sharded over the batch axes (MaxText multihost loading)."""
        global_shapes = {k: (np.shape(v)[0] * jax.process_count(),) + np.shape(v)[1:] for k, v in local_batch.items()}
        partitioning.validate_batch(global_shapes, self.mesh, self.rules, self.microbatches)
        shardings = self.batch_shardings(local_batch)
        return {
            k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v), global_shapes[k])
            for k, v in local_batch.items()
        }

    # ----- steps -----
    def _grads(self, params: PyTree, batch: PyTree, rng: jax.Array):
        grad_fn = jax.value_and_grad(self.model.loss_fn, has_aux=True)
        if self.microbatches == 1:
            (loss, aux), grads = grad_fn(params, batch, rng)
            denom, aux = _weighted_aux(aux)
            return loss, aux, denom, grads

        mb = self.microbatches
        batch_spec = tuple(partitioning.batch_sharding(self.mesh, self.rules, 1).spec)

        def split(x):
            # Strided microbatches ([b] -> [mb, b/mb]): each device keeps its own rows.
            x = x.reshape((x.shape[0] // mb, mb) + x.shape[1:]).swapaxes(0, 1)
            spec = PartitionSpec(None, *batch_spec, *([None] * (x.ndim - 2)))
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

        micro = jax.tree.map(split, batch)
        abstract_aux = jax.eval_shape(
            lambda: _weighted_aux(self.model.loss_fn(params, jax.tree.map(lambda x: x[0], micro), rng)[1])[1]
        )

        def body(carry, xs):
            index, mbatch = xs
            grad_sum, loss_sum, aux_sum, denom_sum = carry
            (loss, aux), grads = grad_fn(params, mbatch, jax.random.fold_in(rng, index))
            denom, aux = _weighted_aux(aux)
            grad_sum = jax.tree.map(lambda a, g: a + g * denom, grad_sum, grads)
            aux_sum = {k: aux_sum[k] + aux[k] * denom for k in aux_sum}
            return (grad_sum, loss_sum + loss * denom, aux_sum, denom_sum + denom), None

        init = (
            jax.tree.map(jnp.zeros_like, params),
            jnp.zeros((), jnp.float32),
            {k: jnp.zeros(v.shape, v.dtype) for k, v in abstract_aux.items()},
            jnp.zeros((), jnp.float32),
        )
        (grad_sum, loss_sum, aux_sum, denom), _ = jax.lax.scan(body, init, (jnp.arange(mb), micro))
        grads = jax.tree.map(lambda g: _divide(g, denom), grad_sum)
        return _divide(loss_sum, denom), {k: _divide(v, denom) for k, v in aux_sum.items()}, denom, grads

    def _train_step(self, state: TrainState, batch: PyTree, base_rng: jax.Array):
        rng = jax.random.fold_in(base_rng, state.step)
        loss, aux, denom, grads = self._grads(state.params, batch, rng)
        new_state = state.apply_gradients(grads, self.optimizer.tx)
        out = {
            **aux,
            "loss": loss,
            LOSS_DENOMINATOR: denom,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(new_state.params),
            "learning_rate": jnp.asarray(self.optimizer.learning_rate(state.step), jnp.float32),
        }
        return new_state, out

    def _eval_step(self, params: PyTree, batch: PyTree):
        loss, aux = self.model.eval_fn(params, batch)
        denom, aux = _weighted_aux(aux)
        return {**aux, "loss": loss, LOSS_DENOMINATOR: denom}

    def compile_train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
        """jit once with explicit in/out shardings and the state donated; logs compile time and memory."""
        if self._compiled_train is not None:
            return self._compiled_train
        shardings = self._initializer.shardings
        batch_shardings = {k: v.sharding for k, v in batch.items()}
        replicated = partitioning.replicated(self.mesh)
        jitted = jax.jit(
            self._train_step,
            in_shardings=(shardings, batch_shardings, replicated),
            out_shardings=(shardings, replicated),
            donate_argnums=(0,),
        )
        start = time.perf_counter()
        with self._context():
            lowered = jitted.lower(state, batch, self.dropout_rng)
            self._compiled_train = lowered.compile(cpu_runtime.train_step_compiler_options(self.mesh))
        self.compile_seconds = time.perf_counter() - start
        try:
            self.memory_analysis = self._compiled_train.memory_analysis()
        except Exception:  # not every backend implements it
            self.memory_analysis = None
        logging.info("train step compiled in %.2fs; memory analysis: %s", self.compile_seconds,
                     _memory_summary(self.memory_analysis))
        return self._compiled_train

    def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update (`state` is donated: do not use it afterwards)."""
        return self.compile_train_step(state, batch)(state, batch, self.dropout_rng)

    def eval_step(self, params: PyTree, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        if self._compiled_eval is None:
            replicated = partitioning.replicated(self.mesh)
            with self._context():
                self._compiled_eval = jax.jit(
                    self._eval_step,
                    in_shardings=(self._initializer.shardings.params, {k: v.sharding for k, v in batch.items()}),
                    out_shardings=replicated,
                ).lower(params, batch).compile()
        return self._compiled_eval(params, batch)

    def evaluate(self, params: PyTree, batches: Iterator[Batch], max_batches: int | None = None) -> dict[str, float]:
        """Denominator-weighted means of the eval metrics over the batches."""
        sums: dict[str, float] = {}
        total = 0.0
        for i, local in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            m = jax.device_get(self.eval_step(params, self.global_batch(local)))
            denom = float(m.pop(LOSS_DENOMINATOR))
            total += denom
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * denom
        return {k: v / total for k, v in sums.items()} if total > 0 else {}


def _memory_summary(analysis: Any) -> str:
    if analysis is None:
        return "unavailable"
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
    parts = [f"{f.replace('_size_in_bytes', '')}={getattr(analysis, f) / 2**20:.1f}MiB"
             for f in fields if hasattr(analysis, f)]
    return ", ".join(parts) or str(analysis)


class NonFiniteLossError(InputError):
    """The training loss became NaN or infinite; main reports it in one line and exits 2."""


def _check_finite_loss(step: int, step_metrics: Mapping[str, Any], model_dir: pathlib.Path) -> None:
    """Raise NonFiniteLossError naming the step when its loss or gradient norm (replicated
    scalars: every host sees the same values and stops at the same step) is not finite. A
    finite loss with a non-finite gradient already poisons the parameters of that step."""
    loss, grad_norm, lr = (float(v) for v in jax.device_get(
        [step_metrics["loss"], step_metrics["grad_norm"], step_metrics["learning_rate"]]))
    if np.isfinite(loss) and np.isfinite(grad_norm):
        return
    raise NonFiniteLossError(
        f"training loss is {loss} (gradient norm {grad_norm}) at step {step} (learning rate {lr:.3g}); "
        f"stopped before saving that step (checkpoints already in {model_dir} are untouched). Usual causes: token "
        f"ids outside the model's vocab_size, a learning rate too high, or float16/bfloat16 overflow",
        field="loss",
    )


def _model_vocab_size(model: BaseModel) -> int | None:
    vocab = getattr(getattr(getattr(model, "module", None), "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def check_vocabulary(model: BaseModel, data: Any, first_batch: Batch | None = None) -> None:
    """Refuse data whose vocabulary (the iterator's `vocab_size`, e.g. the seqio task's
    SentencePiece vocabulary with its extra ids) or whose token ids (features named `*_tokens`
    of the first batch) do not fit the model's embedding table: such ids index past it (JAX
    gathers then return NaN) and training silently reaches loss=nan."""
    model_vocab = _model_vocab_size(model)
    if model_vocab is None:
        return
    data_vocab = getattr(data, "vocab_size", None)
    if isinstance(data_vocab, int) and data_vocab > model_vocab:
        raise InputError(
            f"the training data's vocabulary has {data_vocab} ids but the model's vocab_size is {model_vocab}; "
            f"use a model config with vocab_size >= {data_vocab} (gin: t5.preset_config.vocab_size) or a smaller "
            f"vocabulary", field="vocab_size",
        )
    for key, value in (first_batch or {}).items():
        if key.endswith("_tokens") and np.size(value) and np.issubdtype(np.asarray(value).dtype, np.integer):
            largest = int(np.max(value))
            if largest >= model_vocab:
                raise InputError(
                    f"feature {key!r} holds token id {largest}, outside the model's vocab_size {model_vocab} "
                    f"(ids must be < vocab_size)", field="vocab_size",
                )


def _agree_across_hosts(has_batch: bool, stop_requested: bool) -> tuple[bool, bool]:
    """(every host has a batch, some host asked to stop): one tiny all-gather per step, so every
    host takes the same decision at the same step (a host that ran out of data, or received a
    signal, would otherwise leave the others waiting in the next step's collectives)."""
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.array([has_batch, stop_requested], np.int32)))
    flags = flags.reshape(-1, 2)
    return bool(flags[:, 0].all()), bool(flags[:, 1].any())


class _PreemptionFlag:
    """Turns SIGTERM/SIGINT into a flag checked at step boundaries (a second signal aborts)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum
        print(f"kard_jax: received {signal.Signals(signum).name}; will checkpoint at the next step boundary",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _model_from(model: BaseModel | Any) -> BaseModel:
    if isinstance(model, BaseModel):
        return model
    from kard_jax.models import t5
    from kard_jax.models.base import EncoderDecoderModel

    if isinstance(model, t5.T5Config):
        return EncoderDecoderModel(t5.T5(model))
    raise TypeError(f"model must be a BaseModel or a t5.T5Config, got {type(model).__name__}")


def _iterator_from(data: Any) -> data_iterator.BatchIterator:
    if hasattr(data, "__next__"):
        return data
    if callable(data):
        return data()
    raise TypeError(f"data must be a BatchIterator or a callable returning one, got {type(data).__name__}")


def _write_operative_config(model_dir: pathlib.Path) -> str:
    """Write MODEL_DIR/config.gin (what gin bound for this run; near-empty without gin) and return it."""
    import gin

    from kard_jax import gin_utils

    text = gin.operative_config_str()
    if jax.process_index() == 0:
        gin_utils.write_operative_config(model_dir)
    return text


def train(
    *,
    model_dir: str | os.PathLike,
    model: BaseModel | Any,
    train_data: data_iterator.BatchIterator | Callable[[], data_iterator.BatchIterator],
    train_steps: int,
    eval_data: data_iterator.BatchIterator | Callable[[], data_iterator.BatchIterator] | None = None,
    mesh_config: partitioning.MeshConfig = partitioning.MeshConfig(),
    logical_axis_rules: partitioning.LogicalAxisRules | None = None,
    optimizer: optimizers.Optimizer | None = None,
    microbatches: int = 1,
    save_period: int = 1000,
    keep_checkpoints: int | None = 3,
    eval_period: int = 0,
    eval_steps: int | None = None,
    log_period: int = 10,
    seed: int = 0,
    initial_checkpoint: checkpoints.InitialCheckpoint = None,
    async_checkpointing: bool = True,
) -> TrainState:
    """Train `model` for `train_steps` updates in total, resuming from MODEL_DIR when possible.

    Resume order: the newest readable checkpoint in `model_dir` -> `initial_checkpoint` (an
    earlier run's MODEL_DIR / checkpoint step directory, or a callable returning params, e.g. an
    HF import) -> scratch. SIGTERM/SIGINT save a checkpoint at the next step boundary and return.
    `model` is a BaseModel or a `t5.T5Config`; `optimizer` defaults to AdamW at a constant 1e-4.
    Returns the final train state.
    """
    if train_steps < 0 or save_period < 1 or log_period < 1:
        raise ValueError("train_steps must be >= 0 and save_period, log_period >= 1")
    model_dir = pathlib.Path(model_dir).absolute()
    model = _model_from(model)
    optimizer = optimizer or optimizers.adamw()
    rules = partitioning.standard_logical_axis_rules() if logical_axis_rules is None else logical_axis_rules
    mesh = mesh_config.make_mesh()
    is_main = jax.process_index() == 0
    if is_main:
        model_dir.mkdir(parents=True, exist_ok=True)
    gin_text = _write_operative_config(model_dir)
    logging.info("mesh %s, %d processes, model dir %s", dict(mesh.shape), jax.process_count(), model_dir)

    trainer = Trainer(model, optimizer, mesh=mesh, logical_axis_rules=rules, microbatches=microbatches, seed=seed)
    train_iter = _iterator_from(train_data)
    check_vocabulary(model, train_iter)
    first_batch = next(train_iter)  # shapes for initialisation; used as step 1's batch on a fresh start
    check_vocabulary(model, train_iter, first_batch)
    initializer = trainer.initializer({k: np.shape(v) for k, v in first_batch.items()})
    metadata = {
        "gin_config": gin_text,
        "mesh_shape": {k: int(v) for k, v in mesh.shape.items()},
        "process_count": jax.process_count(),
        "versions": checkpoints.package_versions(),
    }

    checkpointer = checkpoints.Checkpointer(model_dir, keep=keep_checkpoints, async_save=async_checkpointing)
    pending_batch: Batch | None = first_batch
    restored = checkpointer.restore_latest(initializer.sharded_abstract_state)
    if restored is not None:
        state = restored.state
        if restored.data_iterator and hasattr(train_iter, "set_state"):
            train_iter.set_state(restored.data_iterator)
            pending_batch = None
        logging.info("resumed from step %d in %s", restored.step, checkpointer.directory)
        if is_main:
            print(f"kard_jax: resumed from checkpoint step {restored.step}", file=sys.stderr, flush=True)
    elif initial_checkpoint is not None:
        if callable(initial_checkpoint):
            params = initial_checkpoint()
            source = getattr(initial_checkpoint, "__name__", repr(initial_checkpoint))
        else:
            params = checkpoints.restore_params(initial_checkpoint, initializer.sharded_abstract_state.params)
            source = str(initial_checkpoint)
        state = initializer.from_params(params)
        logging.info("initialised params from %s", source)
    else:
        state = initializer.from_scratch(trainer.init_rng)
        logging.info("initialised from scratch (seed %d)", seed)

    start_step = int(jax.device_get(state.step))
    writer = metrics.MetricsWriter(model_dir / "train", enabled=is_main)
    eval_writer = metrics.MetricsWriter(model_dir / "eval", enabled=is_main and eval_data is not None)
    eval_source = eval_data
    eval_start_state = None
    if eval_data is not None and hasattr(eval_data, "get_state"):
        eval_start_state = eval_data.get_state()

    def run_eval(step: int) -> None:
        if eval_source is None:
            return
        if eval_start_state is not None:
            eval_source.set_state(eval_start_state)
        results = trainer.evaluate(state.params, _iterator_from(eval_source), eval_steps)
        eval_writer.write_scalars(step, results)
        eval_writer.flush()
        logging.info("eval at step %d: %s", step, results)

    from tqdm import tqdm

    progress = tqdm(total=train_steps, initial=start_step, disable=not is_main, desc="train", dynamic_ncols=True)
    pending_metrics: list[tuple[int, dict[str, jax.Array]]] = []
    tokens_since_log = 0
    last_log_time = time.perf_counter()
    step = start_step
    multihost = jax.process_count() > 1
    last_loss: tuple[int, Any] | None = None  # (step, its metrics) not yet checked for finiteness

    def check_loss() -> None:
        nonlocal last_loss
        if last_loss is not None:
            _check_finite_loss(*last_loss, model_dir)
            last_loss = None

    try:
        with _PreemptionFlag() as preempted:
            while step < train_steps:
                local = pending_batch if pending_batch is not None else next(train_iter, None)
                pending_batch = None
                signalled = preempted.signum is not None
                if multihost:
                    has_batch, signalled = _agree_across_hosts(local is not None, signalled)
                    local = local if has_batch else None
                if local is None:
                    logging.warning("train data exhausted at step %d (of %d)", step, train_steps)
                    break
                batch = trainer.global_batch(local)
                if trainer.compile_seconds is None:
                    trainer.compile_train_step(state, batch)
                    if is_main:
                        writer.write_scalars(step, {"compile_seconds": trainer.compile_seconds})
                    last_log_time = time.perf_counter()
                state, step_metrics = trainer.train_step(state, batch)
                step += 1
                # Check the previous step's loss now that this step is queued (no pipeline stall).
                check_loss()
                last_loss = (step, step_metrics)
                tokens_since_log += model.batch_tokens(local) * jax.process_count()
                pending_metrics.append((step, step_metrics))
                progress.update(1)

                # Multi-host: every host must stop at the same step: a signal on any host (agreed
                # above, before this step) or the TPU runtime's preemption sync point decides.
                # One host: our signal flag, read after the step.
                if multihost:
                    stop = signalled or checkpointer.reached_preemption(step)
                else:
                    stop = preempted.signum is not None
                if step % log_period == 0 or step == train_steps or stop:
                    fetched = jax.device_get([m for _, m in pending_metrics])
                    elapsed = time.perf_counter() - last_log_time
                    for (s, _), m in zip(pending_metrics, fetched):
                        m = {k: float(v) for k, v in m.items()}
                        m.pop(LOSS_DENOMINATOR, None)
                        writer.write_scalars(s, m)
                    n = len(pending_metrics)
                    writer.write_scalars(step, {"step_seconds": elapsed / n, "tokens_per_second": tokens_since_log / elapsed})
                    writer.flush()
                    last = {k: float(v) for k, v in fetched[-1].items()}
                    progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['learning_rate']:.2e}")
                    pending_metrics.clear()
                    tokens_since_log = 0
                    last_log_time = time.perf_counter()
                if eval_period and step % eval_period == 0:
                    run_eval(step)
                if step % save_period == 0 or step == train_steps or stop:
                    check_loss()  # never save a state whose last update was not finite
                    checkpointer.save(step, state, _iterator_state(train_iter), {**metadata, "step": step})
                if stop:
                    checkpointer.wait_until_finished()
                    message = f"preempted: saved a checkpoint at step {step} and stopped"
                    logging.warning(message)
                    if is_main:
                        print(f"kard_jax: {message}", file=sys.stderr, flush=True)
                    break
            check_loss()
            if step == train_steps and step > start_step and eval_period and step % eval_period:
                run_eval(step)
    finally:
        progress.close()
        checkpointer.close()
        writer.close()
        eval_writer.close()
    return state


def _iterator_state(it: Any) -> dict[str, Any] | None:
    return it.get_state() if hasattr(it, "get_state") else None

