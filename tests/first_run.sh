#!/usr/bin/env bash
# Run a command (the test suite: `make test`, `make test-all`, CI) as a first run on a new machine:
# every cache and config directory the project or its libraries write points into a fresh temporary
# directory, removed afterwards, so no test passes because an earlier run left a file in ~/.cache.
# Afterwards it checks that the command wrote nothing outside the repository's ignored build folders
# and that temporary directory: a file created or changed under $HOME, or a new file in the
# repository, fails the run with its name.
#
#     tests/first_run.sh python -m pytest -q
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
sandbox=$(mktemp -d "${TMPDIR:-/tmp}/dit-first-run.XXXXXX")
trap 'rm -rf "$sandbox"' EXIT
mkdir -p "$sandbox/tmp"

export XDG_CACHE_HOME=$sandbox/cache XDG_CONFIG_HOME=$sandbox/config XDG_DATA_HOME=$sandbox/data XDG_STATE_HOME=$sandbox/state
export TORCH_HOME=$sandbox/torch                       # torch hub, the Inception weights' folder
export TORCHINDUCTOR_CACHE_DIR=$sandbox/inductor TRITON_CACHE_DIR=$sandbox/triton TRITON_HOME=$sandbox/triton-home
export HF_HOME=$sandbox/huggingface                    # diffusers / hub / accelerate's default config
export MPLCONFIGDIR=$sandbox/matplotlib                # matplotlib's font cache
export WANDB_DIR=$sandbox/wandb WANDB_CACHE_DIR=$sandbox/wandb-cache WANDB_CONFIG_DIR=$sandbox/wandb-config WANDB_DATA_DIR=$sandbox/wandb-data
# No __pycache__ written into site-packages or the tree; the bytecode pip compiled when installing is read, as on
# any machine after make setup (a cache prefix here would make every process compile torch from source: ~15 s each).
export PYTHONDONTWRITEBYTECODE=1
export TMPDIR=$sandbox/tmp                             # pytest's tmp_path, torchelastic, tempfile

# What is in the repository before (tracked changes, untracked and ignored files), to compare after.
repo_state() { git -C "$repo" status --porcelain --ignored --untracked-files=all | grep -v -E '(^| |/)(__pycache__|\.pytest_cache)/' | sort; }
before=$(repo_state)
touch "$sandbox/started"

"$@"
status=$?

escaped=$(find "$HOME" -xdev -newer "$sandbox/started" -not -path "$repo" -not -path "$repo/*" -not -path "$sandbox*" 2>/dev/null | head -20)
new_in_repo=$(comm -13 <(echo "$before") <(repo_state) | head -20)
if [ -n "$escaped" ]; then
  echo "first_run: the command wrote outside the repository and its temporary directory (under \$HOME):" >&2
  echo "$escaped" >&2
  status=1
fi
if [ -n "$new_in_repo" ]; then
  echo "first_run: the command left files in the repository (tests write into their tmp_path):" >&2
  echo "$new_in_repo" >&2
  status=1
fi
exit $status
