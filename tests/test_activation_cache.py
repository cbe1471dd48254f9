"""The chunked activation cache and the extraction that writes it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.activation_cache import ActivationCache, CacheWriter, cache_complete
from common.errors import UserError
from common.extraction import extract
from common.targets import dataset_fingerprint


def _write(tmp_path, n=1000, dim=6, chunk_rows=128, batch=37, dtype="float16"):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, 5, size=n)
    writer = CacheWriter(tmp_path / "cache", dim, chunk_rows=chunk_rows, dtype=dtype)
    for s in range(0, n, batch):
        writer.append(x[s:s + batch], labels[s:s + batch], np.arange(s, min(s + batch, n)))
    assert not cache_complete(tmp_path / "cache")  # no manifest yet
    cache = writer.finish()
    return cache, x, labels


def test_roundtrip_in_order(tmp_path):
    cache, x, labels = _write(tmp_path)
    assert len(cache) == 1000 and cache.dim == 6 and cache.n_chunks == 8
    assert cache.chunk_sizes == [128] * 7 + [104]
    batches = list(cache.iter_batches(100))
    assert [len(b.x) for b in batches] == [100] * 10
    got = torch.cat([b.x for b in batches])
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), x.astype(np.float16).astype(np.float32))
    assert torch.equal(torch.cat([b.indices for b in batches]), torch.arange(1000))
    assert torch.equal(torch.cat([b.labels for b in batches]), torch.from_numpy(labels))
    assert cache.fingerprint == dataset_fingerprint(labels)
    cache.require_dataset(labels)
    with pytest.raises(UserError, match="another dataset"):
        cache.require_dataset(labels[:-1])


def test_shuffle_is_a_seeded_permutation_with_bounded_windows(tmp_path):
    cache, x, _ = _write(tmp_path, dtype="float32")
    a = list(cache.iter_batches(64, shuffle=True, seed=1))
    b = list(cache.iter_batches(64, shuffle=True, seed=1))
    c = list(cache.iter_batches(64, shuffle=True, seed=2))
    idx_a = torch.cat([t.indices for t in a])
    assert torch.equal(idx_a, torch.cat([t.indices for t in b]))
    assert not torch.equal(idx_a, torch.cat([t.indices for t in c]))
    assert sorted(idx_a.tolist()) == list(range(1000)) and not torch.equal(idx_a, torch.arange(1000))
    # every row travels with its own activation
    for batch in a:
        np.testing.assert_array_equal(batch.x.numpy(), x[batch.indices.numpy()])
    assert all(len(t.x) == 64 for t in a[:-1])


def test_subset_keeps_order_and_rows(tmp_path):
    cache, x, labels = _write(tmp_path, dtype="float32")
    rows = np.array([3, 500, 129, 999, 0])
    sub = cache.subset(rows)
    assert len(sub) == 5
    got = torch.cat([b.x for b in sub.iter_batches(2)])
    np.testing.assert_array_equal(got.numpy(), x[np.sort(rows)])
    assert sub.indices.tolist() == sorted(rows.tolist())
    assert len(list(sub.iter_batches(2, shuffle=True))) == 3
    mask = np.zeros(1000, bool)
    mask[::2] = True
    half = cache.subset(mask)
    assert len(half) == 500 and half.subset(np.array([0, 2])).indices.tolist() == [0, 4]


def test_unfinished_and_corrupt_caches_fail_in_one_line(tmp_path):
    with pytest.raises(UserError, match="missing or unfinished"):
        ActivationCache(tmp_path / "nope")
    writer = CacheWriter(tmp_path / "c", 4, chunk_rows=8)
    writer.append(np.ones((20, 4)), np.zeros(20), np.arange(20))
    with pytest.raises(UserError, match="unfinished"):
        ActivationCache(tmp_path / "c")
    writer.finish()
    (tmp_path / "c" / "chunk_00001.npy").write_bytes(b"garbage")
    assert not cache_complete(tmp_path / "c")
    with pytest.raises(UserError, match="corrupt"):
        ActivationCache(tmp_path / "c")


def test_bad_input_is_rejected(tmp_path):
    writer = CacheWriter(tmp_path / "c", 4, chunk_rows=8)
    with pytest.raises(UserError, match="shape"):
        writer.append(np.ones((3, 5)), np.zeros(3), np.arange(3))
    with pytest.raises(UserError, match="do not match"):
        writer.append(np.ones((3, 4)), np.zeros(2), np.arange(3))
    with pytest.raises(UserError, match="overflow float16"):  # a full chunk is flushed as float16
        writer.append(np.full((8, 4), 1e6), np.zeros(8), np.arange(8))
    with pytest.raises(UserError, match="chunk_rows"):
        CacheWriter(tmp_path / "d", 4, chunk_rows=0)
    w = CacheWriter(tmp_path / "e", 4, chunk_rows=8)
    w.append(np.ones((2, 4)), np.zeros(2), np.array([1, 1]))
    with pytest.raises(UserError, match="same dataset index twice"):
        w.finish()


def test_writer_resumes_from_finished_chunks(tmp_path):
    writer = CacheWriter(tmp_path / "c", 4, chunk_rows=8)
    writer.append(np.arange(84, dtype=np.float32).reshape(21, 4), np.zeros(21), np.arange(21))
    del writer  # "interrupted": two finished chunks, 5 buffered rows lost
    (tmp_path / "c" / ".chunk_00002.rows.npy.abc123.tmp").write_bytes(b"cut short")   # a killed write
    again = CacheWriter(tmp_path / "c", 4, chunk_rows=8)
    assert again.rows_done == 16
    assert not list((tmp_path / "c").glob("*.tmp"))                                   # nothing half-written kept
    again.append(np.arange(64, 84, dtype=np.float32).reshape(5, 4), np.zeros(5), np.arange(16, 21))
    cache = again.finish()
    np.testing.assert_array_equal(cache.read_all().numpy(), np.arange(84, dtype=np.float32).reshape(21, 4))
    other = CacheWriter(tmp_path / "d", 4, chunk_rows=8)
    other.append(np.ones((9, 4)), np.zeros(9), np.arange(9))
    assert CacheWriter(tmp_path / "d", 4, chunk_rows=4).rows_done == 0  # other settings: start again
    assert CacheWriter(tmp_path / "c", 4, chunk_rows=8).rows_done == 0  # a finished cache is rewritten


class _Images(Dataset):
    def __init__(self, n=50):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 4, 4, generator=g)
        self.y = torch.arange(n) % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), i


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 7))
        self.fc = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def test_extract_from_dataset_and_loader(tmp_path):
    torch.manual_seed(0)
    net, data = _Net(), _Images()
    cache = extract(net, data, "body", "identity", tmp_path / "a", batch_size=8, chunk_rows=16, dtype="float32")
    with torch.no_grad():
        expected = net.body(data.x)
    torch.testing.assert_close(cache.read_all(), expected)
    assert cache.indices.tolist() == list(range(50)) and cache.labels.tolist() == data.y.tolist()
    cache.require_dataset(data.y)
    loader = DataLoader(data, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(3))
    shuffled = extract(net, loader, "body", "identity", tmp_path / "b", chunk_rows=16, dtype="float32")
    assert shuffled.fingerprint == cache.fingerprint  # same dataset, whatever the visiting order
    torch.testing.assert_close(shuffled.read_all(), expected[shuffled.indices])


def test_extract_resumes_after_interruption(tmp_path):
    torch.manual_seed(0)
    net, data = _Net(), _Images()
    calls = []

    def crashing_forward(model, images):
        calls.append(len(images))
        if len(calls) == 5:
            raise KeyboardInterrupt
        return model(images)

    with pytest.raises(KeyboardInterrupt):
        extract(net, data, "body", "identity", tmp_path / "a", batch_size=8, chunk_rows=16,
                forward=crashing_forward)
    assert not cache_complete(tmp_path / "a")
    seen = []
    cache = extract(net, data, "body", "identity", tmp_path / "a", batch_size=8, chunk_rows=16,
                    forward=lambda m, x: seen.append(len(x)) or m(x))
    assert sum(seen) == 1 + 50 - 16  # one probe row, then everything after the first finished chunks (2 x 16)
    with torch.no_grad():
        expected = net.body(data.x)
    torch.testing.assert_close(cache.read_all(), expected.half().float())


def test_target_writer_streams_rows_by_index(tmp_path):
    from common.targets import TargetTable, TargetWriter

    labels = np.arange(12) % 3
    targets = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    order = np.random.default_rng(1).permutation(12)
    with TargetWriter(tmp_path / "t.npy", labels, 5) as writer:
        for block in np.array_split(order, 4):
            writer.write(torch.from_numpy(block), torch.from_numpy(targets[block]))
        writer.finish(cycle=0)
    table = TargetTable(tmp_path / "t.npy", labels)
    np.testing.assert_array_equal(table.lookup(torch.tensor([4, 0, 11])).numpy(), targets[[4, 0, 11]])
    with pytest.raises(UserError, match="never written"), TargetWriter(tmp_path / "u.npy", labels, 5) as writer:
        writer.write([0, 1], targets[:2])
        writer.finish()
    with pytest.raises(UserError, match="written twice"), TargetWriter(tmp_path / "u.npy", labels, 5) as writer:
        writer.write([0, 1], targets[:2])
        writer.write([1], targets[1:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.npy"]  # no half-written table


def test_cache_dataset_gives_rows_by_position(tmp_path):
    from common.activation_cache import CacheDataset

    cache, x, labels = _write(tmp_path, dtype="float32")
    data = CacheDataset(cache.subset(np.array([2, 130, 999])))
    assert len(data) == 3
    row, label, index = data[1]
    np.testing.assert_array_equal(row.numpy(), x[130])
    assert (label, index) == (int(labels[130]), 130)
    batch = next(iter(DataLoader(CacheDataset(cache), batch_size=5, shuffle=False)))
    np.testing.assert_array_equal(batch[0].numpy(), x[:5])
    assert batch[2].tolist() == [0, 1, 2, 3, 4]


def _ddp_extract(rank, world, init_file, out, batch_size):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        extract(_Net(), _Images(), "body", "identity", out, batch_size=batch_size, chunk_rows=16, dtype="float32")
    finally:
        dist.destroy_process_group()


def test_extract_under_ddp_matches_one_process(tmp_path):
    """Three gloo ranks: every global batch split over the ranks and written by rank 0, in dataset order."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    reference = extract(_Net(), _Images(), "body", "identity", tmp_path / "one", batch_size=8, chunk_rows=16,
                        dtype="float32")
    mp.spawn(_ddp_extract, args=(3, str(tmp_path / "init"), str(tmp_path / "ddp"), 7), nprocs=3, join=True)
    ddp = ActivationCache(tmp_path / "ddp")
    assert ddp.indices.tolist() == list(range(50)) and ddp.fingerprint == reference.fingerprint
    torch.testing.assert_close(ddp.read_all(), reference.read_all())
