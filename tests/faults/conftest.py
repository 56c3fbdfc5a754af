"""A `pointsx serve --workers 2` on a fresh PostgreSQL database, shared by the fault suites that race
requests through two hub processes at once; audited and stopped (SIGTERM, exit 0) at the end."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine

from exchange.config import load_key
from exchange.store.engine import make_engine
from tests import harness
from tests.auditor import check_invariants
from tests.conftest import BACKENDS
from tests.faults.hubproc import HubProcess
from tests.faults.storm import StormHub
from tests.integration.test_clearing_crash import new_data_dir


@dataclass(frozen=True)
class WorkersHub:
    process: HubProcess
    engine: Engine

    @property
    def storm_hub(self) -> StormHub:
        return StormHub(self.process.target, load_key(self.process.data / "operator.key"), self.engine)


@pytest.fixture(scope="session")
def workers_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkersHub]:
    if "postgres" not in BACKENDS:
        pytest.skip("PostgreSQL deselected by POINTSX_TEST_BACKENDS")
    url, name = harness.fresh_postgres_database()
    engine = make_engine(url)
    try:
        with HubProcess(new_data_dir(tmp_path_factory.mktemp("workers")), url, workers=2) as process:
            process.start()
            yield WorkersHub(process, engine)
            code = process.stop()
            assert code == 0, f"the hub exited {code} on SIGTERM:\n{process.output()}"
        check_invariants(engine)
    finally:
        engine.dispose()
        harness.drop_postgres_database(name)
