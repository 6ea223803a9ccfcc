"""seqio Task / Mixture registration for KARD (names `kard_{dataset}_{variant}`).

`register_kard_tasks(dataset, ...)` registers, from the files it is given (gin binds them):

  kard_{ds}_ft          question -> "Answer: X"                     train + eval splits
  kard_{ds}_rd          question -> rationale + answer (no knowledge)  train (+ eval: answer only)
  kard_{ds}_kard        question + top-n passages retrieved with the rationale -> rationale + answer
  kard_{ds}_kard_eval   question + passages chosen as at inference -> "Answer: X"   eval splits
  kard_{ds}_reranker    (question, candidates, labels) per kept rationale           train

Each task's source builds its records on demand (kard_jax.tasks.sources, pure Python) and the
token pipeline is seqio's: `tokenize` -> `CacheDatasetPlaceholder` -> `append_eos_after_trim`, so a
task can be materialized offline (kard_jax.tasks.cache) and read back with `use_cached=True`.
Registration reads nothing but the vocabulary; files are read when a split is first requested.
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import seqio
from tqdm.auto import tqdm

from kard_jax.data import prompts
from kard_jax.data.splits import VALIDATION_SPLIT, is_held_out
from kard_jax.data.example import Example
from kard_jax.data.readers import read_examples
from kard_jax.errors import InputError
from kard_jax.tasks import metrics, preprocessors, sources, vocab as vocab_lib

STUDENT_VARIANTS = ("ft", "rd", "kard", "kard_eval")
RERANKER_VARIANT = "reranker"
EVAL_PASSAGE_SOURCES = ("question", "oracle", "ranking")
# Where a reranker record's candidates come from (`register_kard_tasks(reranker_candidate_pool=)`).
RERANKER_CANDIDATE_POOLS = ("union", "question")
TRAIN_SPLIT = "train"
DEFAULT_SHUFFLE_BUFFER = 10_000


# Task name -> (variant, the `register_kard_tasks` arguments it was registered with): what
# `kard_jax.tasks.cache` records in a materialized task's manifest and checks when reading it back.
TASK_SETTINGS: dict[str, tuple[str, dict]] = {}


def task_name(dataset: str, variant: str) -> str:
    return f"kard_{dataset}_{variant}"


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
    """The registered Task or Mixture `name`; an unknown name raises a ValueError listing the
    registered KARD names (and reminding that registration is a function call)."""
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        known = sorted(n for n in [*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()] if n.startswith("kard_"))
        raise InputError(
            f"no seqio task or mixture named {name!r}; registered KARD names: {known or 'none'} "
            "(tasks exist only after kard_jax.tasks.registry.register_kard_tasks(...) has run)",
            field="task",
        ) from None


def _student_features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {
        "inputs": seqio.Feature(vocabulary=vocab, add_eos=True, required=True),
        "targets": seqio.Feature(vocabulary=vocab, add_eos=True, required=True),
    }


class KardData:
    """Lazily loaded inputs of one dataset's tasks, and the record builders for each variant."""

    def __init__(
        self,
        dataset: str,
        *,
        train_path: str,
        rationales_path: str | None,
        retrieval_cache_dir: str | None,
        kb_dir: str | None,
        eval_paths: Mapping[str, str],
        eval_retrieval_cache_dirs: Mapping[str, str],
        eval_rankings: Mapping[str, str],
        eval_passage_source: str,
        n_passages: int,
        budget: sources.Budget,
        example_format: str,
        query_form: str | None,
        reranker_max_candidates: int | None = None,
        reranker_holdout_fraction: float = 0.0,
        reranker_candidate_pool: str = "union",
        reranker_stored_passages: bool = False,
        reranker_holdout_start: float = 0.0,
    ):
        self.dataset = dataset
        self.split_paths = {TRAIN_SPLIT: train_path, **dict(eval_paths)}
        self.rationales_path = rationales_path
        self.retrieval_cache_dir = retrieval_cache_dir
        self.kb_dir = kb_dir
        self.eval_retrieval_cache_dirs = dict(eval_retrieval_cache_dirs)
        self.eval_rankings = dict(eval_rankings)
        self.eval_passage_source = eval_passage_source
        self.n_passages = n_passages
        self.budget = budget
        self.example_format = example_format
        self._query_form = query_form
        self.reranker_max_candidates = reranker_max_candidates
        self.reranker_holdout_fraction = reranker_holdout_fraction
        self.reranker_candidate_pool = reranker_candidate_pool
        self.reranker_stored_passages = reranker_stored_passages
        self.reranker_holdout_start = reranker_holdout_start

    @functools.cached_property
    def query_form(self) -> str:
        """The question query of the reranker records: the one the retrieval cache retrieved the
        candidates with (its manifest), so training queries and candidates cannot disagree."""
        from kard_jax.knowledge import atomic

        manifest_path = pathlib.Path(self.retrieval_cache_dir) / "manifest.json"
        cached = atomic.read_json(manifest_path).get("config", {}).get("query_form", "question")
        if self._query_form is not None and self._query_form != cached:
            raise InputError(f"the retrieval cache was built with query_form={cached!r} but the task asks for "
                             f"{self._query_form!r}; rebuild the cache or use the same QUERY_FORM",
                             path=manifest_path, field="query_form")
        return cached

    @functools.lru_cache(maxsize=None)
    def examples(self, split: str) -> list[Example]:
        if split not in self.split_paths:
            raise InputError(f"no examples file for split {split!r}; known: {sorted(self.split_paths)}", field="split")
        return read_examples(self.split_paths[split], format=self.example_format, dataset=self.dataset)

    @functools.cached_property
    def rationales(self) -> dict[str, list[str]]:
        from kard_jax.teacher.store import read_rationales

        return read_rationales(self.rationales_path)

    @functools.cached_property
    def passage_store(self):
        from kard_jax.knowledge.passage_store import PassageStore

        # A knowledge-base dir from `knowledge.run.build_kb` keeps its store in passages/.
        kb = pathlib.Path(self.kb_dir)
        return PassageStore(kb / "passages" if (kb / "passages").is_dir() else kb)

    def passages(self, passage_ids: Sequence[str], *, source: str | os.PathLike | None = None):
        store = self.passage_store
        out = []
        for pid in passage_ids:
            try:
                out.append(store[store.index_of(pid)])
            except KeyError:
                raise InputError(f"passage id {pid!r} is not in the knowledge base {self.kb_dir}", path=source,
                                 field="passage_ids") from None
        return out

    @functools.cached_property
    def _cache_config(self) -> dict:
        from kard_jax.knowledge import atomic

        return atomic.read_json(pathlib.Path(self.retrieval_cache_dir) / "manifest.json").get("config", {})

    def lexical_features(self, query: str, row: Mapping) -> list[float]:
        """The hybrid reranker's feature of a retrieval-cache row's candidates
        (`reranker.lexical_features`): BM25 against the question query, z-scored over the
        question's own top-k (the rest are the rationales' extras), as `inference.rerank` does over
        the list it reranks. A BM25 cache row already holds these scores (`question_scores`); a
        dense one is scored with the knowledge base's BM25 index."""
        from kard_jax.models.reranker import lexical_features

        if self._cache_config.get("question_retriever", "bm25") == "bm25":
            bm25 = row["question_scores"]
        else:
            from kard_jax.knowledge.bm25 import BM25Index

            directory = pathlib.Path(self.kb_dir) / "bm25"
            if not directory.is_dir():
                raise InputError("the reranker's lexical feature needs the knowledge base's BM25 index (bm25/) "
                                 "with a dense retrieval cache; build the KB with runs/build_kb.gin",
                                 path=self.kb_dir, field="kb_dir")
            bm25 = BM25Index.load(directory).score_candidates(query, self.passage_store.indices_of(row["candidate_ids"]))
        return [float(x) for x in lexical_features(bm25, self._cache_config.get("question_top_k"))]

    @functools.lru_cache(maxsize=None)
    def _rationale_index(self, cache_dir: str) -> dict:
        from kard_jax.knowledge.retrieval_cache import read_rationale_retrieval

        return sources.index_rationale_retrieval(read_rationale_retrieval(cache_dir), source=cache_dir)

    @functools.lru_cache(maxsize=None)
    def _question_index(self, cache_dir: str) -> dict:
        from kard_jax.knowledge.retrieval_cache import read_question_candidates

        return {str(row["question_id"]): row for row in read_question_candidates(cache_dir)}

    def _progress(self, records, split: str, variant: str) -> list[dict]:
        return list(tqdm(records, desc=f"{task_name(self.dataset, variant)}:{split}", unit=" ex", mininterval=2.0,
                         disable=None))

    # --- record builders, one per variant ---------------------------------------------------

    def ft(self, split: str) -> list[dict]:
        return self._progress(sources.ft_records(self.examples(split), self.budget), split, "ft")

    def rd(self, split: str) -> list[dict]:
        if split != TRAIN_SPLIT:  # evaluation: no knowledge, answer-only targets
            return self._progress(sources.eval_records(self.examples(split), None, self.budget), split, "rd")
        return self._progress(sources.rd_records(self.examples(split), self.rationales, self.budget), split, "rd")

    def kard(self, split: str) -> list[dict]:
        cache = self.retrieval_cache_dir
        index = self._rationale_index(cache)

        def rationale_passages(question_id: str, rationale_index: int, rationale: str):
            row = sources.rationale_row(index, question_id, rationale_index, rationale, source=cache)
            return self.passages(row["passage_ids"][: self.n_passages], source=cache)

        records = sources.kard_records(self.examples(split), self.rationales, rationale_passages, self.budget)
        return self._progress(records, split, "kard")

    def kard_eval(self, split: str) -> list[dict]:
        source = self.eval_passage_source
        if source == "ranking":
            if split not in self.eval_rankings:
                raise InputError(f"eval_passage_source='ranking' but no rankings file for split {split!r}",
                                 field="eval_rankings")
            path = self.eval_rankings[split]
            rankings = sources.read_rankings(path)

            def question_passages(question_id: str):
                if question_id not in rankings:
                    raise InputError(f"no ranking for question {question_id!r}", path=path, field="question_id")
                return self.passages(rankings[question_id][: self.n_passages], source=path)
        else:
            if split not in self.eval_retrieval_cache_dirs:
                raise InputError(f"no retrieval cache for eval split {split!r}", field="eval_retrieval_cache_dirs")
            cache = self.eval_retrieval_cache_dirs[split]
            if source == "question":
                rows = self._question_index(cache)

                def question_passages(question_id: str):
                    if question_id not in rows:
                        raise InputError(f"no candidates for question {question_id!r}", path=cache,
                                         field="question_id")
                    return self.passages(rows[question_id]["candidate_ids"][: self.n_passages], source=cache)
            else:  # silver oracle: passages retrieved with the question's first kept rationale
                index = self._rationale_index(cache)
                first = {}
                for (qid, ri), row in sorted(index.items()):
                    first.setdefault(qid, row)

                def question_passages(question_id: str):
                    if question_id not in first:
                        raise InputError(f"no rationale retrieval for question {question_id!r} (oracle)", path=cache,
                                         field="question_id")
                    return self.passages(first[question_id]["passage_ids"][: self.n_passages], source=cache)

        return self._progress(sources.eval_records(self.examples(split), question_passages, self.budget), split,
                              "kard_eval")

    @functools.cached_property
    def passage_vectors(self) -> np.ndarray:
        """The knowledge base's dense passage embeddings [num_passages, dim] (embeddings/, written by
        `build_kb` with an EMBEDDER), in store order: a stored-passages reranker's candidates."""
        from kard_jax.knowledge import run as knowledge_run

        return knowledge_run.load_passage_vectors(self.kb_dir, len(self.passage_store),
                                                  field="reranker_stored_passages")

    def _with_passage_positions(self, records: Iterable[dict]) -> Iterator[dict]:
        """Stored-passages records: the candidates' store positions in place of their texts (no
        candidate tokens: the model never reads them, and tokenizing 100 passages per record, even
        empty ones, dominated the input pipeline); `preprocessors.gather_passage_vectors` turns
        them into vectors after the cache, so records and caches stay small."""
        for record in records:
            positions = self.passage_store.indices_of(record["candidate_ids"])
            yield {**record, "candidates": [], "candidate_positions": np.asarray(positions, np.int32)}

    def _reranker_pool_size(self) -> int | None:
        """How many of a cache row's candidates a reranker record may use: all of them ("union"),
        or the question's own retrieved list ("question": the first `question_top_k`)."""
        if self.reranker_candidate_pool == "union":
            return None
        top_k = self._cache_config.get("question_top_k")
        if not top_k:
            raise InputError("reranker_candidate_pool='question' needs the retrieval cache's question_top_k "
                             "(its manifest has none: rebuild the cache with runs/retrieve.gin)",
                             path=self.retrieval_cache_dir, field="reranker_candidate_pool")
        return int(top_k)

    def reranker(self, split: str) -> list[dict]:
        cache = self.retrieval_cache_dir
        rows = self._question_index(cache)
        pool = self._reranker_pool_size()

        def candidates(question_id: str, rationale_index: int):
            row = rows.get(question_id)
            labels = None if row is None else row["labels"].get(str(rationale_index))
            if labels is None:
                raise InputError(f"no reranker labels for question {question_id!r} rationale {rationale_index}",
                                 path=cache, field="labels")
            return self.passages(row["candidate_ids"][:pool], source=cache), labels[:pool]

        @functools.lru_cache(maxsize=1)  # records come question by question (one per rationale)
        def lexical(query: str, question_id: str) -> list[float]:
            return self.lexical_features(query, rows[question_id])[:pool]

        if split not in (TRAIN_SPLIT, VALIDATION_SPLIT):
            raise InputError(f"the reranker task has splits 'train' and 'validation', not {split!r}", field="split")
        held_out = split == VALIDATION_SPLIT
        examples = [e for e in self.examples(TRAIN_SPLIT)
                    if is_held_out(e.id, self.reranker_holdout_fraction, self.reranker_holdout_start) == held_out]
        records = sources.reranker_records(examples, self.rationales, candidates, self.query_form,
                                           max_candidates=self.reranker_max_candidates,
                                           lexical_features=lexical)
        if self.reranker_stored_passages:
            records = self._with_passage_positions(records)
        return self._progress(records, split, RERANKER_VARIANT)


def _add_task(name: str, **kwargs) -> str:
    seqio.TaskRegistry.remove(name)  # re-registration (a second gin run in one process) replaces
    seqio.TaskRegistry.add(name, **kwargs)
    return name


def _student_task(name: str, build: Callable[[str], list[dict]], splits: Sequence[str],
                  vocab: seqio.Vocabulary, shuffle_buffer_size: int) -> str:
    return _add_task(
        name,
        source=seqio.FunctionDataSource(
            preprocessors.make_dataset_fn(build, preprocessors.STUDENT_SIGNATURE), splits=list(splits)
        ),
        output_features=_student_features(vocab),
        preprocessors=[
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        postprocess_fn=metrics.postprocess_answer,
        metric_fns=[metrics.answer_accuracy],
        shuffle_buffer_size=shuffle_buffer_size,
    )


def register_kard_tasks(
    dataset: str,
    *,
    train_path: str,
    vocab_path: str,
    rationales_path: str | None = None,
    retrieval_cache_dir: str | None = None,
    kb_dir: str | None = None,
    n_passages: int = 1,
    input_length: int = 512,
    target_length: int = 256,
    eval_paths: Mapping[str, str] | None = None,
    eval_retrieval_cache_dirs: Mapping[str, str] | None = None,
    eval_rankings: Mapping[str, str] | None = None,
    eval_passage_source: str = "question",
    reranker_vocab_path: str | None = None,
    example_format: str = "kard",
    prompt_template: str | None = None,
    extra_ids: int = vocab_lib.T5_EXTRA_IDS,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
    query_form: str | None = None,
    reranker_max_candidates: int | None = None,
    reranker_holdout_fraction: float = 0.0,
    reranker_candidate_pool: str = "union",
    reranker_stored_passages: bool = False,
    reranker_holdout_start: float = 0.0,
) -> list[str]:
    """Register every KARD task the given files allow; returns the registered names.

    ft always; rd with `rationales_path`; kard and reranker with rationales + `retrieval_cache_dir`
    + `kb_dir`; kard_eval with `eval_paths` + `kb_dir` + (`eval_retrieval_cache_dirs` or
    `eval_rankings`). `input_length` / `target_length` are the token lengths the student will be
    fed (EOS included): prompts are truncated to fit them (knowledge first; the rationale, not
    the answer line, in targets). `eval_passage_source`: "question" (the eval cache's question
    candidates: BM25 or dense, as the cache was built), "oracle" (silver: passages retrieved with
    a rationale of the eval question) or "ranking" (`eval_rankings`: JSON lines
    {"question_id", "passage_ids"} written by a reranker / dense retriever). `prompt_template`
    names the prompt wording (a dataset or family known to `prompts.template_for`; default
    `dataset`), so variants such as "medqa_pubmed" can reuse a dataset's template. `query_form`
    (`kard_jax.data.query`): the reranker's question query; None takes the retrieval cache's, a
    different one is refused. `reranker_max_candidates`: candidates per reranker record (chosen by
    `sources.select_candidates` before tokenizing); `reranker_holdout_fraction`: questions
    (`kard_jax.data.is_held_out`, from `reranker_holdout_start`: a cross-validation fold) moved
    from the reranker's 'train' split to 'validation';
    `reranker_candidate_pool`: "union" (the KARD release: the question's retrieved list plus the
    passages its rationales retrieve beyond it) or "question" (only the question's retrieved list,
    the candidates inference reranks; the rationales still label them). `reranker_stored_passages`:
    reranker records also carry `candidate_vectors`, the knowledge base's embeddings of their
    candidates (for `RerankerModel(stored_passages=True)`).
    """
    arguments = dict(locals())  # first: every argument, for TASK_SETTINGS (the task cache's fingerprint)
    if reranker_candidate_pool not in RERANKER_CANDIDATE_POOLS:
        raise InputError(f"reranker_candidate_pool must be one of {RERANKER_CANDIDATE_POOLS}, "
                         f"got {reranker_candidate_pool!r}", field="reranker_candidate_pool")
    if eval_passage_source not in EVAL_PASSAGE_SOURCES:
        raise InputError(f"eval_passage_source must be one of {EVAL_PASSAGE_SOURCES}, got {eval_passage_source!r}",
                         field="eval_passage_source")
    for field, value in (("n_passages", n_passages), ("input_length", input_length),
                         ("target_length", target_length)):
        if int(value) < 1:
            raise InputError(f"must be >= 1, got {value}", field=field)
    vocab = vocab_lib.load_vocabulary(vocab_path, extra_ids=extra_ids)
    budget = sources.Budget(
        template=prompts.template_for(prompt_template or dataset),
        input_tokens=input_length - 1,
        target_tokens=target_length - 1,
        count_tokens=vocab_lib.token_counter(vocab),
    )
    eval_paths = dict(eval_paths or {})
    data = KardData(
        dataset,
        train_path=train_path,
        rationales_path=rationales_path,
        retrieval_cache_dir=retrieval_cache_dir,
        kb_dir=kb_dir,
        eval_paths=eval_paths,
        eval_retrieval_cache_dirs=eval_retrieval_cache_dirs or {},
        eval_rankings=eval_rankings or {},
        eval_passage_source=eval_passage_source,
        n_passages=n_passages,
        budget=budget,
        example_format=example_format,
        query_form=query_form,
        reranker_max_candidates=reranker_max_candidates,
        reranker_holdout_fraction=reranker_holdout_fraction,
        reranker_candidate_pool=reranker_candidate_pool,
        reranker_stored_passages=reranker_stored_passages,
        reranker_holdout_start=reranker_holdout_start,
    )
    all_splits = [TRAIN_SPLIT, *eval_paths]
    names = [_student_task(task_name(dataset, "ft"), data.ft, all_splits, vocab, shuffle_buffer_size)]
    if rationales_path:
        names.append(_student_task(task_name(dataset, "rd"), data.rd, all_splits, vocab, shuffle_buffer_size))
    if rationales_path and retrieval_cache_dir and kb_dir:
        names.append(_student_task(task_name(dataset, "kard"), data.kard, [TRAIN_SPLIT], vocab,
                                   shuffle_buffer_size))
        reranker_vocab = (vocab_lib.load_vocabulary(reranker_vocab_path, extra_ids=extra_ids)
                          if reranker_vocab_path else vocab)
        names.append(_add_task(
            task_name(dataset, RERANKER_VARIANT),
            source=seqio.FunctionDataSource(
                preprocessors.make_dataset_fn(data.reranker, preprocessors.reranker_signature(reranker_stored_passages)),
                splits=[TRAIN_SPLIT] + ([VALIDATION_SPLIT] if reranker_holdout_fraction > 0 else []),
            ),
            output_features={"query": seqio.Feature(vocabulary=reranker_vocab, add_eos=True, required=True)},
            preprocessors=[
                seqio.preprocessors.tokenize,
                functools.partial(preprocessors.tokenize_candidates, vocabulary=reranker_vocab),
                seqio.CacheDatasetPlaceholder(),
                *([functools.partial(preprocessors.gather_passage_vectors, table=lambda: data.passage_vectors)]
                  if reranker_stored_passages else []),
                seqio.preprocessors.append_eos_after_trim,
                functools.partial(preprocessors.trim_candidates, eos_id=reranker_vocab.eos_id),
            ],
            shuffle_buffer_size=shuffle_buffer_size,
        ))
    has_eval_passages = eval_rankings if eval_passage_source == "ranking" else eval_retrieval_cache_dirs
    if eval_paths and kb_dir and has_eval_passages:
        names.append(_student_task(task_name(dataset, "kard_eval"), data.kard_eval, list(eval_paths), vocab,
                                   shuffle_buffer_size))
    for name in names:
        TASK_SETTINGS[name] = (name[len(task_name(dataset, "")):], arguments)
    return names


def register_kard_mixture(name: str, tasks: Sequence[str], rates: Mapping[str, float] | None = None) -> str:
    """A seqio Mixture of already registered KARD tasks (several datasets trained together);
    `rates` maps task name -> mixing rate (default: equal rates)."""
    rates = dict(rates or {})
    for task in [*tasks, *rates]:
        get_task_or_mixture(task)
    unknown = set(rates) - set(tasks)
    if unknown:
        raise InputError(f"rates given for tasks not in the mixture: {sorted(unknown)}", field="rates")
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(t, float(rates.get(t, 1.0))) for t in tasks])
    return name

