import collections
import hashlib
import io
import tarfile

import pytest

from reasonedit.shapes.abstract import CATEGORIES
from reasonedit.shapes.oracle import Oracle
from reasonedit.data.samples import SchemaError
from reasonedit.shapes.world import OPS, Edit, Scene, apply_edits
from reasonedit.data.shards import read_records
from reasonedit.shapes.synth import ERROR_TYPES, SynthConfig, SynthError, Synthesizer, split_of, synthesize
from reasonedit.shapes.verify import verify_dataset


@pytest.fixture(scope="module")
def reflections(world):
    synth = Synthesizer(world, seed=0)
    return [synth.reflection("train", i) for i in range(2000)]


def test_oracle_agrees_with_every_stated_reflection_decision(world, reflections):
    oracle = Oracle(world)
    for r in reflections:
        rep = oracle.score(r.candidate, Scene.from_dict(r.meta["target_scene"]), source=r.source)
        assert (rep.decision, rep.score) == (r.decision, r.score), r.key


def test_reflection_mix_is_about_three_to_one_to_one(reflections):
    counts = collections.Counter(r.decision for r in reflections)
    assert abs(counts["Success"] / len(reflections) - 0.6) < 0.05
    assert abs(counts["Reflection"] / len(reflections) - 0.2) < 0.04
    assert abs(counts["Failed"] / len(reflections) - 0.2) < 0.04
    assert {r.error_type for r in reflections} == {t for ts in ERROR_TYPES.values() for t in ts}
    assert {r.meta["instruction_kind"] for r in reflections} == {"abstract", "concrete"}


def test_reflection_corrective_instruction_turns_candidate_into_target(reflections):
    from reasonedit.shapes.oracle import scene_errors
    for r in reflections:
        cand, target = Scene.from_dict(r.meta["candidate_scene"]), Scene.from_dict(r.meta["target_scene"])
        if r.decision == "Reflection":
            assert r.new_instruction
            (err,) = scene_errors(cand, target)
            assert apply_edits(cand, [err.fix()]) == target
        else:
            assert r.new_instruction == ""


def test_every_generated_target_is_success_and_every_unchanged_source_fails(world):
    synth, oracle = Synthesizer(world, seed=1), Oracle(world)
    for i in range(350):
        for rec, source in ((p := synth.edit_pair("val", i)), p.source), ((t := synth.thinking_pair("val", i)), t.image):
            target = Scene.from_dict(rec.meta["target_scene"])
            rep = oracle.score(rec.target, target)
            assert rep.success and rep.score == 10, rec.key
            assert not oracle.score(source, target).success, rec.key


def test_thinking_pairs_resolve_to_their_target_and_cover_every_category(world):
    synth = Synthesizer(world, seed=2)
    pairs = [synth.thinking_pair("train", i) for i in range(100)]
    assert {p.category for p in pairs} == set(CATEGORIES)
    for p in pairs:
        edits = [Edit.from_dict(e) for e in p.meta["edits"]]
        assert len(p.steps) == len(edits)
        target = apply_edits(Scene.from_dict(p.meta["source_scene"]), edits)
        assert target == Scene.from_dict(p.meta["target_scene"])
        assert world.render(target).tobytes() == p.target.tobytes()
        assert p.abstract_instruction != p.concrete_instruction
    multi = [p for p in pairs if p.category == "multi_step"]
    assert all(len(p.steps) >= 2 for p in multi)


def test_edit_pairs_cover_every_op(world):
    synth = Synthesizer(world, seed=3)
    assert {synth.edit_pair("train", i).meta["op"] for i in range(len(OPS))} == set(OPS)


def test_splits_share_no_source_scene(small_dataset):
    seen = collections.defaultdict(set)
    for r in read_records(small_dataset):
        scene = r.meta.get("source_scene") or r.meta["scene"]
        split = r.key.split("_")[0]
        assert split_of(Scene.from_dict(scene)) == split
        seen[split].add(Scene.from_dict(scene).key())
    assert set(seen) == {"train", "val", "test"}
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]


def test_shards_round_trip_field_by_field_and_byte_by_byte(world, small_dataset):
    synth = Synthesizer(world, seed=7)
    n = 0
    for r in read_records(small_dataset):
        split, _, index = r.key.split("_")
        again = synth.make(r.KIND, split, int(index))
        assert r.equals(again), r.key
        n += 1
    assert n == 40 * 4 * 3


def test_same_seed_gives_byte_identical_shards_and_another_seed_does_not(world, tmp_path, small_dataset):
    def digests(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}
    config = SynthConfig(n=40, seed=7, shard_size=15)
    synthesize(tmp_path / "again", config, world)
    assert digests(tmp_path / "again") == digests(small_dataset)
    synthesize(tmp_path / "other", SynthConfig(n=40, seed=8, shard_size=15), world)
    other = digests(tmp_path / "other")
    assert other.keys() == digests(small_dataset).keys()
    assert all(other[k] != v for k, v in digests(small_dataset).items() if k.endswith(".tar"))


def test_verify_reports_full_agreement_on_a_written_dataset(small_dataset):
    agreement = verify_dataset(small_dataset)
    assert agreement.all_agree
    assert agreement.reflection_decision.total == 120 and agreement.targets_perfect.total == 240


def test_verify_names_truncated_and_unreadable_shards_without_a_traceback(small_dataset, tmp_path):
    import shutil

    from conftest import run_cli_here
    from tests.test_loader import rewrite
    from reasonedit.data.loader import DatasetSpec, make_loader
    copy = tmp_path / "d"
    shutil.copytree(small_dataset, copy)
    cut, garbage = sorted((copy / "train").glob("edit_pair-*.tar"))[0], sorted((copy / "train").glob("reflection-*.tar"))[0]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])
    garbage.write_bytes(b"not a tar" * 100)
    bad = sorted((copy / "train").glob("text_to_image-*.tar"))[1]
    rewrite(bad, lambda name, data: b"{broken" if name.endswith("0000016.json") else data)  # one record of 15
    agreement = verify_dataset(copy, "train")
    assert not agreement.all_agree and len(agreement.unreadable) == 2 and len(agreement.skips) == 1
    assert agreement.targets_perfect.total > 0 and agreement.targets_perfect.passed == agreement.targets_perfect.total
    # per record, as the training loader counts them: the same totals by kind and reason
    kinds = ("edit_pair", "reflection", "text_to_image", "thinking_pair")
    loader = make_loader([DatasetSpec(k, copy, split="train", kind=k) for k in kinds], seed=0, shuffle_buffer=8,
                         epochs=1)
    for _ in loader:
        pass
    stats = loader.stats()
    assert agreement.records.skipped == {f"train/{k}": v for k, v in stats.skipped.items()}
    assert agreement.records.yielded == {f"train/{k}": v for k, v in stats.yielded.items()}
    skipped = agreement.records.skipped
    assert skipped["train/reflection"] == {"unreadable_shard": 15} and skipped["train/text_to_image"] == {"bad_json": 1}
    assert list(skipped["train/edit_pair"]) == ["truncated"] and agreement.records.yielded["train/text_to_image"] == 39
    assert sum(skipped["train/edit_pair"].values()) + agreement.records.yielded["train/edit_pair"] == 40
    res = run_cli_here("data", "verify", copy, "--split", "train")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert str(cut) in res.stderr and str(garbage) in res.stderr and "could not be read whole: 2" in res.stdout
    assert "train/reflection" in res.stdout and "unreadable_shard 15" in res.stdout
    assert f"{agreement.records.total_skipped} records skipped" in res.stderr and "0000016" in res.stderr


@pytest.mark.parametrize("manifest", ["{not json", "[]", '{"world": {"no_such_key": 1}, "shards": {}}',
                                      '{"world": {}, "shards": []}', '{"world": {}, "shards": {"train": {"x": [{}]}}}'])
def test_verify_of_a_malformed_manifest_is_one_error_line(tmp_path, manifest):
    from conftest import run_cli_here
    (tmp_path / "manifest.json").write_text(manifest)
    res = run_cli_here("data", "verify", tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"reasonedit: error: {tmp_path / 'manifest.json'}")


def test_a_failure_mid_write_leaves_nothing_behind(world, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = Synthesizer.make

    def flaky(self, kind, split, index):
        calls["n"] += 1
        if calls["n"] == 30:
            raise RuntimeError("disk on fire")
        return real(self, kind, split, index)
    monkeypatch.setattr(Synthesizer, "make", flaky)
    with pytest.raises(RuntimeError):
        synthesize(tmp_path / "out", SynthConfig(n=10, shard_size=4), world)
    assert list(tmp_path.iterdir()) == []


def test_output_rules(world, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(SynthError, match="--overwrite"):
        synthesize(tmp_path / "full", SynthConfig(n=2), world)
    synthesize(tmp_path / "full", SynthConfig(n=2, splits=("train",)), world, overwrite=True)
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "manifest.json").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SynthError, match="cannot write"):
        synthesize(tmp_path / "file" / "sub", SynthConfig(n=2), world)
    with pytest.raises(SynthError, match="data.n"):
        synthesize(tmp_path / "zero", SynthConfig(n=0), world)
    assert not (tmp_path / "zero").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]


def _rewrite_member(shard, name_suffix, data):
    """Copy a shard with the first member ending in `name_suffix` replaced by `data` (None drops it)."""
    src = tarfile.open(shard)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as dst:
        done = False
        for m in src.getmembers():
            payload = src.extractfile(m).read()
            if not done and m.name.endswith(name_suffix):
                done = True
                if data is None:
                    continue
                payload, m.size = data, len(data)
            dst.addfile(m, io.BytesIO(payload))
    shard.write_bytes(buf.getvalue())


@pytest.mark.parametrize("suffix,data,field", [
    (".target.png", b"not a png", "target.png"),
    (".target.png", None, "target.png"),
    (".json", b"{broken", "json"),
])
def test_reader_names_the_bad_field_and_the_shard(small_dataset, tmp_path, suffix, data, field):
    shard = tmp_path / "edit_pair-00000.tar"
    shard.write_bytes((small_dataset / "train" / "edit_pair-00000.tar").read_bytes())
    _rewrite_member(shard, suffix, data)
    with pytest.raises(SchemaError, match=field) as info:
        list(read_records(shard))
    assert str(shard) in str(info.value)


def test_reading_a_missing_dataset_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="reasonedit data synth"):
        list(read_records(tmp_path / "nothing"))


def test_the_config_knows_every_record_kind_the_schema_decodes():
    from reasonedit.config.synth import KINDS
    from reasonedit.data.samples import RECORD_KINDS

    assert sorted(KINDS) == sorted(RECORD_KINDS)
