"""Each Slurm test starts from an empty, healthy test cluster: an earlier test's leftover job or a node Slurm set
DOWN while a test throttled its link would otherwise hold the next test's jobs in the queue."""

import pytest

from support import settle_test_cluster, why_no_slurm


@pytest.fixture(autouse=True)
def settled_cluster(request):
    if request.node.get_closest_marker("slurm") is not None and not why_no_slurm():
        settle_test_cluster()
    yield
