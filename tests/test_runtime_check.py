"""The start-up check that each replica's Ray and Python equal the cluster's."""

from __future__ import annotations

import pytest

from deployments.runtime import EnvironmentMismatchError, compare_versions, local_versions

SAME = {"ray_version": "2.60.0", "python_version": "3.11.7"}


@pytest.mark.parametrize(
    "cluster,match",
    [
        ({**SAME, "ray_version": "2.59.0"}, "ray 2.60.0 here but 2.59.0"),
        ({**SAME, "python_version": "3.12.1"}, "python 3.11.7 here but 3.12.1"),
        ({"ray_version": "2.0.0", "python_version": "3.10.0"}, "ray .*; python"),
    ],
)
def test_mismatch_fails_loudly_naming_both_versions(cluster, match):
    with pytest.raises(EnvironmentMismatchError, match=match):
        compare_versions(SAME, cluster)


def test_equal_versions_pass():
    compare_versions(SAME, dict(SAME))


def test_local_versions_are_strings():
    versions = local_versions()
    assert all(type(v) is str for v in versions.values())
