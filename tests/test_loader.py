import io
import itertools
import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from reasonedit.data import loader as loader_module
from reasonedit.data.loader import DatasetSpec, LoaderError, LoaderStateError, make_loader
from reasonedit.shapes.world import ShapesWorld, WorldConfig
from reasonedit.shapes.synth import SynthConfig, synthesize

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("edit_pair", "text_to_image")


@pytest.fixture(scope="module")
def small_world():
    return ShapesWorld(WorldConfig(image_size=48))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, small_world):
    """45 records of each of two kinds in 7-record shards: 14 shards, uneven over 4 global workers."""
    out = tmp_path_factory.mktemp("loader") / "shapes"
    synthesize(out, SynthConfig(n=45, seed=11, shard_size=7, splits=("train",), kinds=KINDS), small_world)
    return out


def all_keys(dataset):
    return sorted(key for shard in sorted(dataset.rglob("*.tar")) for key in record_keys(shard))


def record_keys(shard):
    with tarfile.open(shard) as tar:
        return list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))


def keys_of(loader, n=None):
    it = iter(loader)
    try:
        return [s.key for s in itertools.islice(it, n)]  # n=None: to the end
    finally:
        it.close()


def mix(dataset, a=0.5, b=0.5):
    return [DatasetSpec("edit", dataset, split="train", kind="edit_pair", weight=a),
            DatasetSpec("t2i", dataset, split="train", kind="text_to_image", weight=b)]


RANK_SCRIPT = """
import json, sys
from reasonedit.data.loader import DatasetSpec, make_loader
loader = make_loader([DatasetSpec("all", sys.argv[1], split="train")], seed=5, num_workers=2, rank=int(sys.argv[2]),
                     world_size=2, shuffle_buffer=6, epochs=1)
keys = [s.key for s in loader]
print(json.dumps({"keys": keys, "per_rank": loader.samples_per_rank()["all"], "stats": loader.stats().yielded}))
"""


def test_two_ranks_of_two_workers_see_every_record_exactly_once(shards):
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(shards), str(rank)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    seen = results[0]["keys"] + results[1]["keys"]
    assert len(seen) == len(set(seen)) and sorted(seen) == all_keys(shards)
    # 14 shards over 4 global workers: the ranks read unequal counts, and say so up front
    assert results[0]["per_rank"] == [len(r["keys"]) for r in results]
    assert [r["stats"]["all"] for r in results] == [len(r["keys"]) for r in results]


def test_one_rank_without_workers_sees_every_record_exactly_once(shards):
    seen = keys_of(make_loader([DatasetSpec("all", shards, split="train")], seed=5, shuffle_buffer=6, epochs=1))
    assert len(seen) == len(set(seen)) and sorted(seen) == all_keys(shards)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.8, 0.2)])
def test_mix_weights_hold_within_four_binomial_std(shards, weights):
    n = 3000
    loader = make_loader(mix(shards, *weights), seed=1, shuffle_buffer=16)  # infinite: both cycle their epochs
    it = iter(loader)
    datasets = [next(it).dataset for _ in range(n)]
    it.close()
    share, p = datasets.count("edit") / n, weights[0] / sum(weights)
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), share


@pytest.mark.parametrize("workers,k,epochs", [
    (0, 37, 2),     # mid-epoch
    (2, 37, 2),     # mid-epoch, an odd count: the next sample is worker 1's
    (0, 86, 2),     # the next samples cross the epoch boundary
    (2, 86, 2),
    (2, 250, None),  # infinite stream, a few epochs in
])
def test_a_restored_loader_continues_the_uninterrupted_stream(shards, workers, k, epochs):
    def build():
        return make_loader(mix(shards, 0.6, 0.4), seed=3, num_workers=workers, shuffle_buffer=5, epochs=epochs)
    m = 60
    uninterrupted = keys_of(build(), k + m if epochs is None else None)
    first = build()
    it = iter(first)
    head = [next(it).key for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    it.close()  # the DataLoader and its workers are torn down
    del first, it
    resumed = build()
    resumed.load_state_dict(state)
    rest = keys_of(resumed, m if epochs is None else None)
    assert head == uninterrupted[:k]
    assert rest == uninterrupted[k:k + m] if epochs is None else rest == uninterrupted[k:]
    if epochs is not None:
        assert len(uninterrupted) == 2 * 90


def where_and_what(record):
    """A transform that says which process ran it; one record kind fails, to come back with its sample."""
    import os
    if record.KIND == "text_to_image" and record.key.endswith("3"):
        raise ValueError(f"{record.key}: no")
    return os.getpid(), record.key


def test_the_transform_runs_in_the_worker_that_reads_the_record_and_resumes_exactly(shards):
    import os
    def build():
        return make_loader(mix(shards, 0.6, 0.4), seed=3, num_workers=2, shuffle_buffer=5, epochs=1,
                           transform=where_and_what)
    loader = build()
    it = iter(loader)
    head = [next(it) for _ in range(20)]
    state = loader.state_dict()
    it.close()
    done = [s for s in head if s.failure is None]
    assert {s.result()[1] for s in done} == {s.key for s in done}
    pids = {s.result()[0] for s in done}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers did the work, the main process none
    failed = [s for s in head if s.failure is not None]
    assert failed and all(s.key.endswith("3") for s in failed)
    with pytest.raises(ValueError, match=f"{failed[0].key}: no"):
        failed[0].result()
    resumed = build()
    resumed.load_state_dict(state)
    assert [s.key for s in resumed][:5] == [s.key for s in build()][20:25]


def test_resume_decodes_only_what_it_yields_and_skips_whole_shards(shards, monkeypatch):
    def build():
        return make_loader([DatasetSpec("all", shards, split="train")], seed=3, shuffle_buffer=5, epochs=1)
    first = build()
    it = iter(first)
    for _ in range(60):
        next(it)
    state = first.state_dict()
    it.close()
    decoded, opened = [], []
    real_decode, real_open = loader_module.record_from_wds, loader_module._open_tar
    monkeypatch.setattr(loader_module, "record_from_wds",
                        lambda s, w: decoded.append(s["__key__"]) or real_decode(s, w))
    monkeypatch.setattr(loader_module, "_open_tar", lambda p: opened.append(p) or real_open(p))
    resumed = build()
    resumed.load_state_dict(state)
    it = iter(resumed)
    nxt = next(it)
    it.close()
    assert decoded == [nxt.key]
    assert len(set(opened)) <= 2  # the shards of the current block (5 records of 7-record shards), none before


def test_same_seed_same_order_another_epoch_or_seed_another_order(shards):
    def order(seed, epoch):
        return keys_of(make_loader(mix(shards), seed=seed, shuffle_buffer=8, epoch=epoch, epochs=1))
    base = order(0, 0)
    assert order(0, 0) == base
    assert order(0, 1) != base and sorted(order(0, 1)) == sorted(base)
    assert order(1, 0) != base and sorted(order(1, 0)) == sorted(base)


# --- corrupt data -------------------------------------------------------------------------------

def rewrite(shard, change):
    """Rewrite a shard, passing each (member name, bytes) through `change`, which may return None to drop it."""
    with tarfile.open(shard) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as dst:
        for m, data in members:
            data = change(m.name, data)
            if data is not None:
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())


def drop_field(name):
    def change(data):
        doc = json.loads(data)
        doc.pop(name)
        return json.dumps(doc).encode()
    return change


CORRUPTIONS = {  # reason: (member suffix, change of its bytes; None drops the member)
    "bad_image": (".png", lambda data: b"not a png at all"),
    "bad_json": (".json", lambda data: b"{broken"),
    "missing_field": (".json", None),  # set per kind below
    "missing_image": (".png", None),
    "wrong_type": (".json", lambda data: json.dumps({**json.loads(data), "meta": "a string"}).encode()),
}


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory, small_world):
    """200 records of each kind, 1% of them broken in each of five ways; returns (dir, good keys, counts)."""
    out = tmp_path_factory.mktemp("corrupt") / "shapes"
    synthesize(out, SynthConfig(n=200, seed=12, shard_size=25, splits=("train",), kinds=KINDS), small_world)
    keys = all_keys(out)
    broken = {reason: keys[i::97][:4] for i, reason in enumerate(CORRUPTIONS)}  # 4 of 400 = 1%, spread over shards
    by_key = {key: reason for reason, ks in broken.items() for key in ks}
    assert len(by_key) == 20
    for shard in out.rglob("*.tar"):
        def change(name, data):
            key = name.split(".")[0]
            reason = by_key.get(key)
            if reason is None:
                return data
            suffix, fn = CORRUPTIONS[reason]
            if not name.endswith(suffix) or (suffix == ".png" and getattr(change, "done", None) == key):
                return data
            change.done = key  # only the first image of a record
            if reason == "missing_field":
                fn = drop_field("caption" if "_t2i_" in key else "instruction")
            return None if fn is None else fn(data)
        rewrite(shard, change)
    return out, sorted(set(keys) - set(by_key)), {reason: 4 for reason in CORRUPTIONS}


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_records_are_skipped_and_counted_by_reason(corrupt, workers):
    dataset, good, counts = corrupt
    loader = make_loader([DatasetSpec("all", dataset, split="train")], seed=2, num_workers=workers,
                         shuffle_buffer=10, epochs=1)
    seen = keys_of(loader)
    assert len(seen) == len(set(seen)) and sorted(seen) == good
    stats = loader.stats()
    assert stats.by_reason() == counts and stats.yielded == {"all": len(good)}


def test_a_truncated_shard_and_an_unreadable_shard_are_counted(shards, tmp_path):
    dataset = tmp_path / "shapes"
    shutil.copytree(shards, dataset)
    cut, garbage = dataset / "train" / "edit_pair-00002.tar", dataset / "train" / "text_to_image-00004.tar"
    with tarfile.open(cut) as tar:
        members = tar.getmembers()
    victim = members[len(members) // 2]
    cut_at = victim.offset_data + victim.size // 2
    lost = {m.name.split(".")[0] for m in members if m.offset_data + m.size > cut_at}
    cut.write_bytes(cut.read_bytes()[:cut_at])
    lost |= set(record_keys(garbage))
    garbage.write_bytes(b"this is not a tar archive " * 40)
    loader = make_loader([DatasetSpec("all", dataset, split="train")], seed=2, num_workers=2, shuffle_buffer=4,
                         epochs=1)
    seen = keys_of(loader)
    assert sorted(seen) == sorted(set(all_keys(shards)) - lost) and len(seen) == len(set(seen))
    # per record: the one cut and those after it, and every record of the unreadable shard (7 each by the manifest)
    assert loader.stats().by_reason() == {"truncated": len(lost) - 7, "unreadable_shard": 7}


def test_skips_after_the_last_sample_are_counted_too(shards, tmp_path):
    shard = tmp_path / "edit_pair-00000.tar"
    shutil.copy(shards / "train" / "edit_pair-00000.tar", shard)
    rewrite(shard, lambda name, data: b"{broken" if name.endswith(".json") else data)
    loader = make_loader([DatasetSpec("one", shard)], seed=0, num_workers=2, shuffle_buffer=4, epochs=1)
    assert keys_of(loader) == []
    assert loader.stats().skipped == {"one": {"bad_json": 7}}


@pytest.fixture(scope="module")
def five_and_four(tmp_path_factory, small_world):
    """9 edit pairs in two shards of 5 and 4 records, listed with their counts in the manifest."""
    out = tmp_path_factory.mktemp("five") / "shapes"
    synthesize(out, SynthConfig(n=9, seed=13, shard_size=5, splits=("train",), kinds=("edit_pair",)), small_world)
    return out


def broken_copy(dataset, tmp_path, damage):
    """A copy of `dataset` whose 5-record shard went through `damage(bytes, members) -> bytes`; (copy, the shard)."""
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    shard = copy / "train" / "edit_pair-00000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    shard.write_bytes(damage(shard.read_bytes(), members))
    return copy, shard


def read_all(spec, workers=0, buffer=3):
    loader = make_loader([spec], seed=0, num_workers=workers, shuffle_buffer=buffer, epochs=1)
    return sorted(keys_of(loader)), loader.stats()


def header_of(members, record, member=0):
    """The byte offset of a member's tar header: `member` of record number `record` (three members a record)."""
    return members[3 * record + member].offset


DAMAGES = {  # how the 5-record shard breaks after its record 2: (damage, the reason it is counted under)
    "cut at the record boundary": (lambda data, ms: data[:header_of(ms, 2)], "truncated"),
    "cut inside record 3": (lambda data, ms: data[:ms[7].offset_data + 100], "truncated"),
    "cut between the members of record 3": (lambda data, ms: data[:header_of(ms, 2, 1)], "truncated"),
    "garbled header in record 3": (lambda data, ms: data[:header_of(ms, 2, 1)] + b"\xff" * 512
                                   + data[header_of(ms, 2, 1) + 512:], "bad_tar"),
}


@pytest.mark.parametrize("case", DAMAGES)
def test_a_shard_broken_after_record_2_of_5_counts_the_3_records_lost(five_and_four, tmp_path, case):
    damage, reason = DAMAGES[case]
    dataset, shard = broken_copy(five_and_four, tmp_path, damage)
    keys, stats = read_all(DatasetSpec("edit", dataset, split="train"))
    assert keys == sorted(all_keys(five_and_four))[:2] + sorted(all_keys(five_and_four))[5:]
    assert stats.skipped == {"edit": {reason: 3}} and stats.uncounted == {"edit": {}}
    # the tar alone has no manifest: what it lost after the damage is unknown, and said so, never guessed
    _, alone = read_all(DatasetSpec("alone", shard))
    cut_inside = case != "cut at the record boundary"  # the record the damage is in is seen, and counted
    assert alone.skipped == {"alone": {reason: 1} if cut_inside else {}}
    assert alone.uncounted == {"alone": {reason: 1}} and alone.total_uncounted == 1
    assert "1 shard of unknown size" in alone.summary()


def test_an_unreadable_shard_counts_every_record_its_manifest_lists(five_and_four, tmp_path):
    dataset, shard = broken_copy(five_and_four, tmp_path, lambda data, ms: b"not a tar archive " * 40)
    keys, stats = read_all(DatasetSpec("edit", dataset, split="train"), workers=2)
    assert keys == sorted(all_keys(five_and_four))[5:] and stats.skipped == {"edit": {"unreadable_shard": 5}}
    _, alone = read_all(DatasetSpec("alone", shard))
    assert alone.skipped == {"alone": {}} and alone.uncounted == {"alone": {"unreadable_shard": 1}}
    assert alone.summary() == "alone: 0 yielded, skipped 0 records (none + 1 shard of unknown size (unreadable_shard))"


def test_a_record_with_a_repeated_member_counts_once_and_the_next_record_is_read(five_and_four, tmp_path):
    def repeat_json_of_record_2(data, ms):  # record 2's json member twice in a row
        start, end = header_of(ms, 2), header_of(ms, 2, 1)
        return data[:end] + data[start:end] + data[end:]
    dataset, _ = broken_copy(five_and_four, tmp_path, repeat_json_of_record_2)
    keys, stats = read_all(DatasetSpec("edit", dataset, split="train"))
    everything = sorted(all_keys(five_and_four))
    assert keys == everything[:2] + everything[3:] and stats.skipped == {"edit": {"duplicate_member": 1}}


def test_skip_counts_of_a_resumed_loader_equal_the_uninterrupted_ones(five_and_four, tmp_path):
    dataset, _ = broken_copy(five_and_four, tmp_path, DAMAGES["cut inside record 3"][0])

    def build():
        return make_loader([DatasetSpec("edit", dataset, split="train")], seed=1, shuffle_buffer=2, epochs=1)
    whole = build()
    keys = keys_of(whole)
    for k in range(1, len(keys)):  # blocks of 2 records: some resumes start mid-shard, before the damage
        first = build()
        it = iter(first)
        head = [next(it).key for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))
        it.close()
        resumed = build()
        resumed.load_state_dict(state)
        assert head + keys_of(resumed) == keys and resumed.stats() == whole.stats(), k
    assert whole.stats().skipped == {"edit": {"truncated": 3}}


def test_an_infinite_stream_over_only_broken_records_raises_instead_of_spinning(shards, tmp_path):
    shard = tmp_path / "edit_pair-00000.tar"
    shutil.copy(shards / "train" / "edit_pair-00000.tar", shard)
    rewrite(shard, lambda name, data: b"{broken" if name.endswith(".json") else data)
    with pytest.raises(LoaderError, match="'one'.*no usable record in 20 epochs"):
        keys_of(make_loader([DatasetSpec("one", shard)], seed=0, shuffle_buffer=4), 1)


# --- rules --------------------------------------------------------------------------------------

def test_a_resume_with_another_worker_count_is_refused_by_name(shards):
    saved = make_loader(mix(shards), seed=0, num_workers=2, shuffle_buffer=4, epochs=1).state_dict()
    with pytest.raises(LoaderStateError, match="workers_per_rank: saved 2, now 3"):
        make_loader(mix(shards), seed=0, num_workers=3, shuffle_buffer=4, epochs=1).load_state_dict(saved)
    with pytest.raises(LoaderStateError, match="world_size"):
        make_loader(mix(shards), seed=0, num_workers=2, rank=0, world_size=2, shuffle_buffer=4,
                    epochs=1).load_state_dict(saved)


def test_an_infinite_stream_needs_a_shard_for_every_global_worker(shards):
    with pytest.raises(LoaderError, match="fewer than the 16 global workers"):
        make_loader(mix(shards), seed=0, num_workers=4, rank=0, world_size=4, shuffle_buffer=4)
