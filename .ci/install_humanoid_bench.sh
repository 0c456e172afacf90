#!/usr/bin/env bash
# Installs the cut-down HumanoidBench copy that ships with this workspace (h1 / h1hand tasks) for the tests.
#
# Usage: .ci/install_humanoid_bench.sh [PYTHON]
#   PYTHON: the interpreter whose environment receives it (default: the `pip` on PATH).
#
# The copy lies at <repo>/../shared/vendor/humanoid-bench-791405f-min.tar.gz. It is unpacked into a fresh
# temporary folder and installed editable and without dependencies:
#   - editable, because a plain install misses humanoid_bench.dmc_deps (that folder has no __init__.py);
#   - --no-deps, because its setup.py pins gymnasium 0.29.1, mujoco 3.1.6 and torch 2.3.1, which would replace
#     this project's versions. torchrl_dreammpc adapts HumanoidBench's MuJoCo sizes table itself.
# jax[cpu] is installed because humanoid_bench imports jax at import time. Nothing here installs torch.
# Users install HumanoidBench from its repository instead (see docs/tasks.md).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tarball="${repo_root}/../shared/vendor/humanoid-bench-791405f-min.tar.gz"

if [[ ! -f "${tarball}" ]]; then
    echo "install_humanoid_bench: ${tarball} not found; skipping HumanoidBench (its tests will be skipped)."
    exit 0
fi

if [[ $# -ge 1 ]]; then
    pip_cmd=("$1" -m pip)
else
    pip_cmd=(pip)
fi

src="$(mktemp -d "${TMPDIR:-/tmp}/humanoid-bench.XXXXXX")"
tar -xzf "${tarball}" -C "${src}"
# The archive holds the project's files at its top level; accept a single top folder too.
if [[ ! -f "${src}/setup.py" ]]; then
    shopt -s nullglob
    candidates=("${src}"/*/setup.py)
    if [[ ${#candidates[@]} -ne 1 ]]; then
        echo "install_humanoid_bench: no setup.py found in ${tarball}" >&2
        exit 1
    fi
    src="$(dirname "${candidates[0]}")"
fi

echo "install_humanoid_bench: installing HumanoidBench from ${src}"
"${pip_cmd[@]}" install --no-deps -e "${src}"
"${pip_cmd[@]}" install "jax[cpu]"
