#!/usr/bin/env bash
# The newcomer's path: do what README.md's first two commands say, on fresh clones of this
# checkout's committed HEAD (uncommitted changes are not part of what a newcomer gets).
#
# The commands are read from README.md itself, its first two ```sh blocks, so the README and this
# check cannot drift apart:
#   1. "See it work": run exactly as written in a fresh clone; it must exit 0, and `pointsx demo`
#      must print the cleared totals of its cycle (the settlements of every merchant and the
#      platform, which sum to zero).
#   2. "Run the tests": run in another fresh clone, with one change: its closing `python -m pytest`
#      becomes `python -m pytest --collect-only -q`. Running the whole suite a second time would
#      double CI's time, and CI runs it anyway; what a newcomer can get wrong here is the install
#      (`pip install -e '.[dev]'` in a fresh venv) and the suite's collection, and those are checked.
#
# Usage: bash scripts/newcomer_check.sh   (needs git, python3 and the package index pip uses)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
head="$(git -C "$repo" rev-parse HEAD)"
work="$(mktemp -d "${TMPDIR:-/tmp}/pointsx-newcomer.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# A newcomer's shell: not inside this checkout's venv, no pointsx settings of ours.
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PATH="$(tr ':' '\n' <<<"$PATH" | grep -vxF "$VIRTUAL_ENV/bin" | paste -sd: -)"
fi
unset VIRTUAL_ENV PYTHONHOME PYTHONPATH POINTSX_DATA_DIR POINTSX_TARGET
export COLUMNS=160 # the demo's tables whole, not cut to 80 columns

# The body of README.md's Nth ```sh block (1-based).
readme_sh_block() {
    awk -v want="$2" '
        /^```/ && inside { inside = 0; if (n == want) exit; next }
        /^```sh[[:space:]]*$/ { n++; inside = 1; next }
        inside && n == want { print }
    ' "$1"
}

fresh_clone() {
    git clone --quiet "$repo" "$1"
    if [[ "$(git -C "$1" rev-parse HEAD)" != "$head" ]]; then # the checkout is on a detached HEAD
        git -C "$1" switch --quiet --detach "$head"
    fi
}

fail() {
    echo "newcomer check FAILED: $1" >&2
    exit 1
}

started=$SECONDS
fresh_clone "$work/see-it-work"
see_it_work="$(readme_sh_block "$work/see-it-work/README.md" 1)"
[[ -n "$see_it_work" ]] || fail "README.md has no first \`\`\`sh block"
echo "== README command 1, in a fresh clone of ${head:0:12}:"
echo "$see_it_work"
if ! (cd "$work/see-it-work" && bash -euo pipefail -c "$see_it_work") >"$work/demo.log" 2>&1; then
    cat "$work/demo.log"
    fail "README command 1 did not exit 0"
fi
# The cleared totals of the demo's cycle: each merchant's and the platform's settlement in fen.
for row in "brew 945" "skyway -1170" "pageturn 200" "platform 25"; do
    merchant="${row% *}" settlement="${row#* }"
    grep -Eq "^│ $merchant +│.*│ $settlement +│" "$work/demo.log" \
        || { cat "$work/demo.log"; fail "the demo did not print $merchant's cleared settlement $settlement"; }
done
grep -q "nets and settlements sum to exactly zero" "$work/demo.log" || fail "the demo did not print its cleared totals"
grep -q "demo complete" "$work/demo.log" || fail "the demo did not complete"
echo "   ok: exit 0, cleared totals printed ($((SECONDS - started)) s)"

started=$SECONDS
fresh_clone "$work/run-the-tests"
run_the_tests="$(readme_sh_block "$work/run-the-tests/README.md" 2)"
[[ "$run_the_tests" == *"python -m pytest" ]] \
    || fail "README command 2 no longer ends with \`python -m pytest\`; make this check follow it: $run_the_tests"
collect="${run_the_tests%python -m pytest}python -m pytest --collect-only -q"
echo "== README command 2, install and collection only, in a fresh clone:"
echo "$collect"
if ! (cd "$work/run-the-tests" && bash -euo pipefail -c "$collect") >"$work/collect.log" 2>&1; then
    tail -n 40 "$work/collect.log"
    fail "README command 2 did not install, or the suite did not collect"
fi
collected="$(grep -Eo '^[0-9]+ tests? collected' "$work/collect.log")" || {
    tail -n 40 "$work/collect.log"
    fail "no \"N tests collected\" line from pytest --collect-only"
}
[[ "${collected%% *}" -gt 0 ]] || fail "the suite collected no tests"
echo "   ok: installed, $collected ($((SECONDS - started)) s)"
echo "newcomer check passed"
