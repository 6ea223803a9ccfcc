#!/usr/bin/env bash
# Install kard_jax (with jax[tpu]) on every worker of the slice, from this checkout, a git ref or a wheel.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE [--git-ref REF [--git-url URL] | --wheel FILE] [options]

Puts the code in ~/$REPO_DIR on every worker and installs it into the virtualenv ~/$VENV_DIR:
  (default)        a tarball of this checkout (without .git, virtualenvs, logs) is copied to every
                   worker and unpacked; then  pip install -e '.[tpu]'
  --git-ref REF    every worker clones/fetches --git-url and checks out REF; then  pip install -e '.[tpu]'
  --wheel FILE     the wheel is installed with the [tpu] extra; the gin configs (gin_configs/, not
                   part of the wheel) are copied from this checkout to ~/$REPO_DIR/gin_configs
Rerunning replaces the code and keeps the virtualenv.

Options:
  --git-ref REF               a branch, tag or commit
  --git-url URL               repository to clone [GIT_URL] (default: this checkout's origin)
  --wheel FILE                a built kard_jax wheel (python -m build --wheel)
$COMMON_USAGE
USAGE
}

GIT_REF=""
GIT_URL="${GIT_URL:-}"
WHEEL=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --git-ref|--git-ref=*) option_value "$@"; GIT_REF="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --git-url|--git-url=*) option_value "$@"; GIT_URL="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --wheel|--wheel=*) option_value "$@"; WHEEL="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    *) parse_common_option "$@" || { usage >&2; die "unknown option: $1"; }; shift "$COMMON_SHIFT" ;;
  esac
done
finish_common_options
[[ -z "$GIT_REF" || -z "$WHEEL" ]] || die "use one of --git-ref and --wheel"

# libtpu for jax[tpu] comes from PyPI; the find-links page covers older pins too.
PIP_TPU="pip install -q -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
VENV="test -d ~/$VENV_DIR || python3 -m venv ~/$VENV_DIR; source ~/$VENV_DIR/bin/activate && pip install -q -U pip"
TARBALL="/tmp/kard_jax_src.tgz"

if [[ -n "$WHEEL" ]]; then
  wheel_name="$(basename "$WHEEL")"
  run tar -C "$REPO_ROOT" -czf "$TARBALL" gin_configs
  tpu_scp all "$WHEEL" "$TPU_NAME:/tmp/$wheel_name"
  tpu_scp all "$TARBALL" "$TPU_NAME:$TARBALL"
  tpu_ssh all "set -e; rm -rf ~/$REPO_DIR && mkdir -p ~/$REPO_DIR && tar -C ~/$REPO_DIR -xzf $TARBALL; \
$VENV && $PIP_TPU '/tmp/${wheel_name}[tpu]'"
elif [[ -n "$GIT_REF" ]]; then
  if [[ -z "$GIT_URL" ]]; then
    if [[ "$DRY_RUN" == 1 ]]; then
      GIT_URL="$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || echo ORIGIN_URL)"
    else
      GIT_URL="$(git -C "$REPO_ROOT" remote get-url origin)" || die "no origin remote; pass --git-url"
    fi
  fi
  tpu_ssh all "set -e; if [ -d ~/$REPO_DIR/.git ]; then git -C ~/$REPO_DIR fetch --tags origin; \
else rm -rf ~/$REPO_DIR && git clone $(quote "$GIT_URL") ~/$REPO_DIR; fi; \
git -C ~/$REPO_DIR checkout --force $(quote "$GIT_REF"); \
$VENV && cd ~/$REPO_DIR && $PIP_TPU -e '.[tpu]'"
else
  run tar -C "$REPO_ROOT" --exclude=.git --exclude='.venv*' --exclude=logs --exclude='*.egg-info' \
    --exclude=__pycache__ -czf "$TARBALL" .
  tpu_scp all "$TARBALL" "$TPU_NAME:$TARBALL"
  tpu_ssh all "set -e; rm -rf ~/$REPO_DIR && mkdir -p ~/$REPO_DIR && tar -C ~/$REPO_DIR -xzf $TARBALL; \
$VENV && cd ~/$REPO_DIR && $PIP_TPU -e '.[tpu]'"
fi
# Every worker reports its install (no TPU work: device discovery needs all hosts at once).
tpu_ssh all "$(remote_env) && python -c 'import jax, kard_jax; print(jax.__version__, kard_jax.__file__)'"
