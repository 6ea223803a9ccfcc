"""Every gin file in the repo parses (REQUIRED macros filled with placeholders), and the CLI's
--dry_run and error paths behave."""
import pathlib
import re
import subprocess
import sys

import gin
import pytest

from kard_jax import gin_utils

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIN_FILES = sorted(p.relative_to(ROOT) for p in (ROOT / "gin_configs").rglob("*.gin"))
REQUIRED = re.compile(r"(\w+)/macro\.value set to `%gin\.REQUIRED`")


def parse_with_placeholders(path: pathlib.Path) -> list[str]:
    """Parses `path`, binding each missing REQUIRED macro to a string; returns those bindings."""
    bindings: list[str] = []
    for _ in range(30):
        gin.clear_config()
        try:
            gin_utils.parse([str(ROOT / path)], bindings)
            return bindings
        except ValueError as e:
            match = REQUIRED.search(str(e))
            if not match:
                raise
            bindings.append(f"{match.group(1)} = '/tmp/placeholder'")
    raise AssertionError(f"{path}: too many REQUIRED macros")


def test_there_are_gin_files():
    assert any(str(p).startswith("gin_configs/runs/") for p in GIN_FILES)
    assert any(str(p).startswith("gin_configs/models/") for p in GIN_FILES)


@pytest.mark.parametrize("path", GIN_FILES, ids=str)
def test_gin_file_parses(path):
    try:
        parse_with_placeholders(path)
    finally:
        gin.clear_config()


def _main(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "kard_jax.main", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_dry_run_prints_config_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _main("--gin_file=gin_configs/runs/demo.gin", f"--gin.OUTPUT_DIR='{out}'", "--dry_run")
    assert proc.returncode == 0, proc.stderr
    assert "dry run OK" in proc.stdout and str(out) in proc.stdout
    assert not out.exists()


@pytest.mark.parametrize(
    "binding, message",
    [
        ("pipeline.run_demo.output_dirr = 'x'", "output_dirr"),  # unknown parameter
        ("pipeline.run_demmo.output_dir = 'x'", "run_demmo"),  # typo in a configurable
    ],
)
def test_bad_binding_fails_in_dry_run_with_gins_message(binding, message):
    proc = _main("--gin_file=gin_configs/runs/demo.gin", f"--gin_bindings={binding}", "--dry_run")
    assert proc.returncode != 0
    assert message in proc.stderr and "invalid gin config" in proc.stderr


@pytest.mark.parametrize("run", ["runs/train_reranker.gin", "runs/eval_reranker.gin"])
def test_minilm_stored_reranker_gin_configures_training_and_evaluation_alike(run):
    """models/reranker_minilm_stored.gin parsed after either run gin binds the same reranker."""
    from kard_jax.models import reranker

    bindings: list[str] = []
    try:
        for _ in range(30):
            gin.clear_config()
            try:
                gin_utils.parse([str(ROOT / "gin_configs" / run), "models/reranker_minilm_stored.gin"], bindings)
                break
            except ValueError as e:
                bindings.append(f"{REQUIRED.search(str(e)).group(1)} = '/tmp/placeholder'")
        model = gin.get_configurable(reranker.RerankerModel)()
        assert model.stored_passages and model.module.head == "dual_encoder" and model.module.proj_dim == 0
        assert model.lexical_weight == 1.0 and model.tau2 == 0.05
        assert model.config.hidden_size == 384  # all-MiniLM-L6-v2
        if run.startswith("runs/train"):
            from kard_jax.tasks import feature_converters, registry

            assert gin.get_configurable(feature_converters.RerankerFeatureConverter)().stored_passages
            assert gin.query_parameter("STORED_PASSAGES/macro.value") is True
            assert gin.query_parameter("CANDIDATE_POOL/macro.value") == "question"
            assert str(gin.query_parameter("registry.register_kard_tasks.reranker_stored_passages")) == "%STORED_PASSAGES"
            del registry
    finally:
        gin.clear_config()
