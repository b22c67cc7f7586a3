#!/usr/bin/env bash
# diffusers' own scheduler tests on diffsampler's drop-ins (tests/test_diffusers_suite.py), from a diffusers
# checkout at a commit close to the installed diffusers: each test that passes on diffusers' classes must pass
# with the drop-ins swapped in. Prints, per test file, how many pass on each; extra arguments go to pytest.
#
#   git clone https://github.com/huggingface/diffusers /tmp/diffusers
#   bash scripts/diffusers_suite.sh /tmp/diffusers          # the checkout, or its tests/ directory
set -euo pipefail

USAGE="usage: bash scripts/diffusers_suite.sh DIFFUSERS_CHECKOUT [pytest arguments]"
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; echo "$USAGE"; exit $(( $# < 1 ))
fi
ARG="$1"
shift
TESTS="$(cd "$ARG" 2>/dev/null && pwd)" || TESTS="$ARG"
[[ -f "$TESTS/schedulers/test_schedulers.py" ]] || TESTS="$TESTS/tests"
if [[ ! -f "$TESTS/schedulers/test_schedulers.py" ]]; then
  echo "diffusers_suite.sh: expected a diffusers checkout or its tests/ directory (with schedulers/test_schedulers.py), got '$ARG'" >&2
  exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIFFSAMPLER_DIFFUSERS_TESTS="$TESTS" exec "${PYTHON:-python3}" -m pytest -q -s tests/test_diffusers_suite.py "$@"
