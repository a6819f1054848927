"""Tests for pairtrace.ray_backend: a local Ray cluster (2 CPUs, 2 actors) writes the same store as the local path."""

from __future__ import annotations

import pytest
import torch

from pairtrace.errors import ManifestMismatchError
from pairtrace.ray_backend import RayOptions, ray_available, read_staged_pairs, staging_path
from pairtrace.store import shard_path
from pairtrace.vectors import compute_datapoint_vectors

pytestmark = [
    pytest.mark.skipif(not ray_available(), reason='Ray Data is not installed (pip install "ray[data]")'),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # Ray's own configuration warnings
]

FIELDS = ("kind", "model", "layers", "template", "dataset", "ids", "shard_size", "dtype", "settings", "n_shards",
          "hidden_size", "n_rows", "ids_file")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # logical CPUs: two single-CPU actors plus Ray Data's own read/collect tasks must never starve each other
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.timeout(300)
def test_ray_backend_writes_the_same_store(ray_cluster, tiny_model_dir, tiny_loaded, tiny_pairs, tmp_path):
    from pairtrace.ray_backend import compute_datapoint_vectors_ray

    kwargs = {"layers": [1, 4], "shard_size": 3, "batch_tokens": 96}
    local = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "local", progress=False, **kwargs)
    options = RayOptions(num_workers=2, keep_staging=True)
    remote = compute_datapoint_vectors_ray(
        tiny_model_dir, tiny_pairs, tmp_path / "ray", options=options, progress=False, **kwargs
    )
    assert remote.complete
    for name in FIELDS:
        assert getattr(remote.manifest, name) == getattr(local.manifest, name), name
    assert remote.manifest.extraction["backend"] == "ray"
    for k in (1, 4):
        torch.testing.assert_close(remote.load(k), local.load(k), rtol=1e-5, atol=1e-6)
    assert torch.equal(remote.n_response_tokens(), local.n_response_tokens())
    assert remote.pair_metadata().equals(local.pair_metadata())
    assert read_staged_pairs(staging_path(tmp_path / "ray", 2)) == tiny_pairs.pairs[6:]

    # resume: only the missing shard is recomputed, by the pool, from a driver that already holds the model
    stamp = shard_path(tmp_path / "ray", 0).stat().st_mtime_ns
    shard_path(tmp_path / "ray", 1).unlink()
    again = compute_datapoint_vectors_ray(
        tiny_loaded, tiny_pairs, tmp_path / "ray", options=RayOptions(num_workers=1), progress=False, **kwargs
    )
    assert shard_path(tmp_path / "ray", 0).stat().st_mtime_ns == stamp
    assert torch.equal(again.load(1), remote.load(1))
    assert not (tmp_path / "ray" / ".staging").exists()
    with pytest.raises(ManifestMismatchError, match="layers"):
        compute_datapoint_vectors_ray(tiny_loaded, tiny_pairs, tmp_path / "ray", options=RayOptions(num_workers=1),
                                      progress=False, **{**kwargs, "layers": [2]})
