#!/usr/bin/env bash
# Build genflow's full CUDA extension on a machine without a GPU and check that every op has a
# CUDA kernel (issue 18, DESIGN.md §5). It does what a GPU user's `pip install` does:
#   1. a separate virtual environment (no system site-packages) with the CUDA build of torch from
#      PyPI (torch==2.13.0 there is the CUDA 13 build with its nvidia-* runtime packages);
#   2. genflow built into it with GENFLOW_BUILD_CUDA=1 for TORCH_CUDA_ARCH_LIST (default sm_80 and
#      sm_90) by `pip install --no-build-isolation`, from a copy of the source tree, so the
#      in-place CPU build of the main environment (genflow/_C*.so, build/temp.*) is untouched;
#   3. .ci/check_cuda_ops.py: imports genflow._C on the CPU and asks the dispatcher whether every
#      op with a CPU kernel has a CUDA kernel too.
# Reruns are cheap: the work folder outside the checkout (so CI's fresh clones reuse it) keeps the
# downloaded wheels (~3.5 GB, a wheelhouse: pip's HTTP cache keeps none of them here), the venv
# (reused while its torch is the right one) and a source copy that rewrites only files whose
# content changed, so its ninja build folder recompiles only those. A lock serialises runs.
#
#   bash .ci/cuda_build.sh    # work folder ~/.cache/genflow/cuda-ci (GENFLOW_CUDA_CI_DIR overrides)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${GENFLOW_CUDA_CI_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/genflow/cuda-ci}
venv=$work/venv
src=$work/src
torch_version=2.13.0
requirements=("torch==$torch_version" "setuptools>=77.0.3" wheel ninja numpy scipy tqdm matplotlib)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export GENFLOW_BUILD_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

nvcc=$(command -v nvcc) || { echo "nvcc not found: the CUDA extension cannot be built"; exit 1; }
# torch.utils.cpp_extension finds the toolkit through CUDA_HOME; /usr/local/bin/nvcc is a wrapper,
# so point it at the real toolkit when the wrapper's folder holds no CUDA headers.
if [ -z "${CUDA_HOME:-}" ]; then
  for candidate in "$(dirname "$(dirname "$(readlink -f "$nvcc")")")" /usr/local/cuda; do
    if [ -f "$candidate/include/cuda_runtime.h" ]; then export CUDA_HOME=$candidate; break; fi
  done
fi
echo "nvcc: $nvcc ($("$nvcc" --version | grep -o 'release [0-9.]*')), CUDA_HOME=${CUDA_HOME:-unset}," \
     "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, work folder $work"

# pip from PyPI alone: this machine's pip configuration adds a local folder holding the CPU wheel
# torch-2.13.0+cpu, which would win over PyPI's CUDA wheel (a local version sorts higher), and a
# constraints file.
pypi_pip() { env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL \
                 PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip "$@"; }

mkdir -p "$work"
exec 9>"$work/lock"
flock 9
started=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
  python -m venv "$venv"
fi
# the venv's torch as "<version without +local> <CUDA version>", e.g. "2.13.0 13.0"
have=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0], torch.version.cuda)" 2>/dev/null || true)
if [ "${have% *}" != "$torch_version" ] || [ "${have#* }" = "None" ]; then
  echo "installing the CUDA build of torch $torch_version into $venv (was: ${have:-none})"
  # from the wheelhouse in the work folder, downloading into it what it lacks: pip's own HTTP cache
  # keeps none of these downloads here, and a venv made again should not fetch ~3.5 GB again
  if ! pypi_pip install --quiet --no-index --find-links "$work/wheels" "${requirements[@]}" 2>/dev/null; then
    pypi_pip download --quiet --dest "$work/wheels" "${requirements[@]}"
    pypi_pip install --quiet --no-index --find-links "$work/wheels" "${requirements[@]}"
  fi
fi
"$venv/bin/python" -c "import torch; print('venv torch', torch.__version__, 'CUDA', torch.version.cuda)"
echo "venv ready in $((SECONDS - started)) s"

# A copy of the working tree's files (tracked and untracked-not-ignored). A file is rewritten only
# when its content differs, so unchanged sources keep their old times and the copy's build/ folder
# recompiles only what changed; files gone from the tree are removed (setup.py globs csrc/).
mkdir -p "$src"
git ls-files -z --cached --others --exclude-standard | sort -z >"$work/files"
(cd "$src" && find . -path ./build -prune -o -path './*.egg-info' -prune -o -type f -printf '%P\0' | sort -z) >"$work/copied"
comm -z -13 "$work/files" "$work/copied" | (cd "$src" && xargs -0 -r rm -f --)
while IFS= read -r -d '' file; do
  if [ -f "$file" ] && ! cmp -s "$file" "$src/$file"; then
    mkdir -p "$src/$(dirname "$file")"
    cp "$file" "$src/$file"
  fi
done <"$work/files"

built=$SECONDS
if ! (cd "$src" && pypi_pip install --no-build-isolation --no-deps --force-reinstall .) >"$work/build.log" 2>&1; then
  tail -n 60 "$work/build.log"
  echo "building genflow with GENFLOW_BUILD_CUDA=1 failed (full log: $work/build.log)"
  exit 1
fi
echo "genflow built with CUDA kernels in $((SECONDS - built)) s"

# -I: neither the current folder nor the script's is put on sys.path, so `import genflow` is the
# venv's CUDA build, never the checkout's CPU build.
(cd "$work" && "$venv/bin/python" -I "$root/.ci/check_cuda_ops.py")
echo "CUDA build step done in $((SECONDS - started)) s"
