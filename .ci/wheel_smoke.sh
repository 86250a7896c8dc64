#!/usr/bin/env bash
# The user's install path, checked from the source tree:
#   1. python -m build --sdist (no torch needed) and a check that the sdist is complete;
#   2. pip wheel <sdist> --no-build-isolation (the dev venv's torch; compiles from the sdist,
#      so a missing header fails here);
#   3. a fresh venv outside the checkout with only $TORCH and that wheel (not editable);
#   4. .ci/smoke.py there: torch.compile(backend="leet") and torch.ops.leet.decay_attn in a
#      process that never imports leet_compile, and the wheel's torch pin.
# With --isolation, also (slow: each isolated build installs torch into its build env):
#   5. pip install <the source tree> (pip's default build isolation) into another fresh venv + smoke;
#   6. pip wheel <sdist> with build isolation + install + smoke.
# Environment: VENV (dev venv with torch and the build tools), TORCH (spec for fresh venvs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
TORCH=${TORCH:-torch==2.13.0}
PY=$ROOT/$VENV/bin/python
ISOLATION=0
[ "${1:-}" = "--isolation" ] && ISOLATION=1
WORK=$(mktemp -d /tmp/leet-wheel-smoke.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { grep --line-buffered -v "^WARNING: Location" || true; }
t0=$(date +%s)
step() { echo "==> [wheel smoke, $(( $(date +%s) - t0 )) s] $*"; }

step "sdist (python -m build --sdist --no-isolation) from a copy of the versioned files"
# a copy: what is not tracked (or untracked-but-not-ignored) cannot leak into the sdist, and
# the build leaves no egg-info in the checkout
mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK/src"
"$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" "$WORK/src" > "$WORK/sdist.log" 2>&1 || { tail -30 "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/*.tar.gz)
echo "    $(basename "$SDIST"): $(tar tzf "$SDIST" | wc -l) files"
# every tracked source, header, doc and example that the build or a reader needs
tar tzf "$SDIST" > "$WORK/sdist.txt"
missing=0
for f in $(git ls-files csrc docs examples build_backend LICENSE setup.py pyproject.toml README.md); do
  grep -qx "leet_compile-[^/]*/$f" "$WORK/sdist.txt" || { echo "    missing from the sdist: $f"; missing=1; }
done
[ $missing = 0 ] || exit 1

step "wheel from the sdist (pip wheel --no-build-isolation, torch of $VENV); compiling"
"$PY" -m pip wheel --no-build-isolation --no-deps -w "$WORK/wheels" "$SDIST" > "$WORK/wheel.log" 2>&1 \
  || { tail -40 "$WORK/wheel.log"; exit 1; }
WHEEL=$(ls "$WORK"/wheels/*.whl)
echo "    $(basename "$WHEEL")"
unzip -p "$WHEEL" '*.dist-info/METADATA' | grep -E "^(Requires-Dist|License-Expression|Version):" | sed 's/^/    /'

fresh_venv() {  # $1: dir; installs $TORCH (from this machine's disk where it lies there)
  python3 -m venv "$1"
  "$1/bin/python" -m pip install -q --progress-bar off "$TORCH" 2>&1 | quiet
}

smoke() {  # $1: venv
  (cd "$WORK" && "$1/bin/python" "$ROOT/.ci/smoke.py")
}

step "fresh venv with $TORCH only (installing torch: about a minute)"
fresh_venv "$WORK/venv"
step "pip install the wheel (not editable)"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL" 2>&1 | quiet
step "smoke test in the fresh venv"
smoke "$WORK/venv"

if [ $ISOLATION = 1 ]; then
  step "pip install . WITH build isolation into a new fresh venv (build env gets torch==2.13.0 or \$LEET_BUILD_TORCH)"
  fresh_venv "$WORK/venv-iso"
  (cd "$WORK" && "$WORK/venv-iso/bin/python" -m pip install "$WORK/src" > "$WORK/iso.log" 2>&1) || { tail -40 "$WORK/iso.log"; exit 1; }
  grep -E "leet_compile build:" "$WORK/iso.log" | sed 's/^/    /' || true
  smoke "$WORK/venv-iso"

  step "pip wheel <sdist> WITH build isolation, then install into a new fresh venv"
  "$WORK/venv-iso/bin/python" -m pip wheel --no-deps -w "$WORK/wheels-iso" "$SDIST" > "$WORK/iso-wheel.log" 2>&1 \
    || { tail -40 "$WORK/iso-wheel.log"; exit 1; }
  fresh_venv "$WORK/venv-iso2"
  "$WORK/venv-iso2/bin/python" -m pip install -q "$WORK"/wheels-iso/*.whl 2>&1 | quiet
  smoke "$WORK/venv-iso2"
fi
step "wheel smoke test passed"
