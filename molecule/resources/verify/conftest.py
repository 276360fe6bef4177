"""Fixtures of the scenarios' checks (run by molecule/resources/verify.yml with pytest)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from monitoring import Monitoring
from zeus_hosts import Deployment, create_api_key, create_user, login, wait_until


@pytest.fixture(scope="session")
def deployment() -> Deployment:
    deployment = Deployment.from_molecule()
    with deployment.client(timeout=10) as client:
        wait_until(
            lambda: client.get("/api/health").status_code == 200,
            timeout=120,
            what=f"{deployment.base_url}/api/health to answer 200 through nginx",
        )
    return deployment


@pytest.fixture(scope="session")
def admin(deployment: Deployment) -> Iterator[httpx.Client]:
    with deployment.client() as client:
        login(client, deployment.admin_email, deployment.admin_password)
        yield client


@pytest.fixture
def analyst(deployment: Deployment, admin: httpx.Client) -> Iterator[tuple[httpx.Client, str]]:
    """A fresh analyst account, logged in through nginx: (client, email)."""
    email, password = create_user(admin, role="analyst")
    with deployment.client() as client:
        login(client, email, password)
        yield client, email


@pytest.fixture(scope="session")
def api_key(deployment: Deployment, admin: httpx.Client) -> str:
    """An API key of a dedicated analyst, for OpenAI-style clients and the load generator."""
    email, password = create_user(admin, role="analyst", prefix="loadgen")
    with deployment.client() as client:
        login(client, email, password)
        return create_api_key(client, "molecule load generator")


@pytest.fixture(scope="session")
def model_id(deployment: Deployment, api_key: str) -> str:
    with deployment.client() as client:
        response = client.get("/api/v1/models", headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 200, f"/api/v1/models answered {response.status_code}: {response.text}"
    return response.json()["data"][0]["id"]


@pytest.fixture(scope="session")
def monitoring(deployment: Deployment) -> Monitoring:
    """Prometheus and Alertmanager of the monitoring host; skips the check when the inventory has none."""
    if deployment.monitoring_host is None:
        pytest.skip("the inventory has no monitoring group")
    return Monitoring(deployment.addresses[deployment.monitoring_host])
