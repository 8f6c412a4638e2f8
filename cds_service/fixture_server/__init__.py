"""fixture_server layer: synthetic FHIR R4 patients served over REST, and the request fixtures.

``create_fixture_app`` / ``run_fixture_server`` serve ``fixtures/patients``;
``build_requests`` writes ``fixtures/requests`` from the same store and search code.
"""

from cds_service.fixture_server.app import (
    FixtureServerState,
    SeenRequest,
    create_fixture_app,
    fixture_state,
    run_fixture_server,
    serve_in_background,
)
from cds_service.fixture_server.store import FhirError, FixtureStore

__all__ = [
    "FhirError",
    "FixtureServerState",
    "FixtureStore",
    "SeenRequest",
    "create_fixture_app",
    "fixture_state",
    "run_fixture_server",
    "serve_in_background",
]
