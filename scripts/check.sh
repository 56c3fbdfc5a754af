#!/usr/bin/env bash
# Static checks: lint, format, types, generated code freshness, migrations vs models.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
mypy exchange clearing merchant_sdk scripts tests
python scripts/gen_proto.py --check
python - <<'PY'
import tempfile, pathlib
from exchange.store import migrate
with tempfile.TemporaryDirectory() as tmp:
    url = f"sqlite:///{pathlib.Path(tmp) / 'check.db'}"
    migrate.upgrade(url)
    migrate.check(url)
print("migrations match the schema")
PY
