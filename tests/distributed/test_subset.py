"""DPDistributed over a train split: only the split's examples are sampled, at the rate charged for it."""


def test_subset_random_sampler_split_is_the_sampled_set_on_every_rank(cluster):
    r0, r1 = cluster.values("tests.distributed.jobs:subset_shards", timeout=30)
    train = set(r0["train"])
    assert set(r0["shard"]) | set(r1["shard"]) == train and not set(r0["shard"]) & set(r1["shard"])
    assert r0["drawn"] and r1["drawn"] and set(r0["drawn"]) | set(r1["drawn"]) <= train  # over 3 epochs
    assert r0["expected_batch_size"] == r1["expected_batch_size"] == 0.3 * len(train)
