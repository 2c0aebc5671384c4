"""One 2-rank gloo cluster (tests/distributed/cluster.py) shared by the session, restarted if a test killed it."""
import pytest

from tests.distributed.cluster import Cluster


@pytest.fixture(scope="session")
def _clusters():
    held = []
    yield held
    for c in held:
        c.close()


@pytest.fixture
def cluster(_clusters):
    if not _clusters or not _clusters[-1].alive:
        _clusters.append(Cluster(world_size=2))
    return _clusters[-1]
