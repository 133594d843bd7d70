"""The integrity chain's reader side: whole-file weight hashes checked by `make validate`, kept in the VALIDATED
stamp, and checked again by the next phase's training. A truncated shard, a 64 KiB overwrite in the middle of a
shard and a single flipped byte are each refused with a one-screen message, never judged and never stamped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cogumi.core.errors import UserError
from cogumi.core.integrity import verify_weights, weights_sha256
from cogumi.core.manifest import read_manifest, write_manifest
from cogumi.core.stamp import VALIDATED_STAMP, read_stamp, require_validated, stamp_is_current, write_stamp

KIB = 1024
MATH_ROWS = [{"task": "math", "id": f"m{i}", "prompt": f"What is {i} times 111111111?",
              "answer": str(111111111 * i)} for i in range(1, 3)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A tiny bf16 model in two shards, the first ~190 KiB (room for a 64 KiB overwrite in its middle)."""
    from cogumi.demo.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("integrity") / "model", max_shard_size="200KB",
                           dtype=torch.bfloat16)


def merged_copy(sharded: Path, where: Path) -> Path:
    """A merged phase output as the merge writes it: weights + a manifest with weights_sha256."""
    shutil.copytree(sharded, where)
    write_manifest(where, "merged", base_model="tiny", weights_sha256=weights_sha256(where))
    return where


def truncate(shard: Path) -> None:
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 4 * KIB)


def overwrite_64k(shard: Path) -> None:
    """64 KiB of other bytes in the middle: same size, header intact, missed by the old sampled fingerprint."""
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.seek(size // 2 - 32 * KIB)
        fh.write(bytes(range(256)) * (64 * KIB // 256))


def flip_byte(shard: Path) -> None:
    with open(shard, "r+b") as fh:
        fh.seek(shard.stat().st_size - 100)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {"truncated": truncate, "64KiB-overwrite": overwrite_64k, "flipped-byte": flip_byte}


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[0]


def test_hashes_cover_every_shard_and_the_index(sharded):
    hashes = weights_sha256(sharded)
    assert sorted(hashes) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                              "model.safetensors.index.json"]
    assert all(len(h) == 64 for h in hashes.values())
    assert verify_weights(sharded, hashes, against="test", fix="-") == hashes


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_shard_is_refused_against_the_manifest(sharded, tmp_path, damage):
    folder = merged_copy(sharded, tmp_path / "phasex_merged")
    DAMAGE[damage](first_shard(folder))
    with pytest.raises(UserError) as err:
        verify_weights(folder, read_manifest(folder)["weights_sha256"], against="its manifest.json", fix="merge")
    assert "model-00001-of-00002.safetensors" in err.value.what and "changed since" in err.value.what
    if damage == "truncated":  # found from the header alone, even without recorded hashes
        with pytest.raises(UserError, match="its header describes"):
            verify_weights(folder, None, against="its manifest.json", fix="merge")


def _validate_config(tmp_path: Path, candidate: Path) -> Path:
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    baseline = tmp_path / "baseline_samples.jsonl"
    baseline.write_text("".join(json.dumps({"task": "math", "id": r["id"], "prompt": r["prompt"], "output": "7"}) + "\n"
                                for r in MATH_ROWS))
    path = tmp_path / "phasex.yaml"
    path.write_text(yaml.safe_dump({"name": "phasex", "output_root": str(tmp_path), "base_model": "unused/hub-id",
                                    "validate": {"tasks": ["math"], "data": {"math": str(tmp_path / "math.jsonl")},
                                                 "baseline": str(baseline), "max_new_tokens": 4,
                                                 "gates": {"math": {"n_min": 2}}}}))
    return path


@pytest.mark.parametrize("damage", DAMAGE)
def test_validate_refuses_a_damaged_candidate_before_judging(sharded, tmp_path, damage, run_script):
    candidate = merged_copy(sharded, tmp_path / "phasex_merged")
    DAMAGE[damage](first_shard(candidate))
    result = run_script("benchmark.py", "--phase", str(_validate_config(tmp_path, candidate)), timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors and "changed since its manifest.json" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (candidate / VALIDATED_STAMP).exists() and not (candidate / "validation").exists()


def test_stamp_records_the_hashes_and_the_next_phase_checks_them(sharded, tmp_path):
    import benchmark
    from train_phase1a_fullprecision import main as train_main

    candidate = merged_copy(sharded, tmp_path / "phasex_merged")
    assert benchmark.main(["--phase", str(_validate_config(tmp_path, candidate))]) == 0
    stamp = read_stamp(candidate)
    assert stamp["weights_sha256"] == read_manifest(candidate)["weights_sha256"]
    assert require_validated(candidate) is None and stamp_is_current(candidate)

    overwrite_64k(first_shard(candidate))  # after validation: the stamp no longer vouches for these bytes
    assert not stamp_is_current(candidate)  # the demo validates again instead of reusing the stamp
    with pytest.raises(UserError, match="changed since it was validated") as err:
        require_validated(candidate, allow_unvalidated=True)  # admits a missing stamp, never a stamp that lies
    assert "model-00001-of-00002.safetensors changed" in err.value.what

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    cfg = tmp_path / "phasey.yaml"
    cfg.write_text(yaml.safe_dump({"name": "phasey", "output_root": str(tmp_path), "base_model": str(candidate),
                                   "data": {"train_path": str(data)}}))
    with pytest.raises(UserError, match="changed since it was validated"):
        train_main(["--phase", str(cfg)])
    assert not (tmp_path / "phasey").exists()


# ---------------------------------------------------------------- the chain of trust: every link removed, corrupted


def _edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del manifest[key]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_validate_refuses_a_candidate_whose_manifest_lost_its_hashes(sharded, tmp_path):
    """The user's report: hashes gone from the manifest, a flipped byte in a shard, and validate used to judge it
    with a warning and stamp it VALIDATED."""
    import benchmark

    candidate = merged_copy(sharded, tmp_path / "phasex_merged")
    _edit_manifest(candidate, weights_sha256=None)
    flip_byte(first_shard(candidate))
    with pytest.raises(UserError, match="no whole-file weight hashes") as err:
        benchmark.main(["--phase", str(_validate_config(tmp_path, candidate))])
    assert "FORCE=1 make merge" in err.value.fix and err.value.where == str(candidate / "manifest.json")
    assert not (candidate / VALIDATED_STAMP).exists() and not (candidate / "validation").exists()


def _stamped(sharded: Path, where: Path) -> Path:
    folder = merged_copy(sharded, where)
    (folder / "merge_report.json").write_text("{}")
    write_stamp(folder, {"gates": []}, weights_sha256=weights_sha256(folder))
    assert require_validated(folder) is None
    return folder


# Each: (what is done to a stamped merge, text of the refusal). ALLOW_UNVALIDATED=1 admits none of them.
BROKEN_LINKS = {
    "manifest-deleted": (lambda f: (f / "manifest.json").unlink(), "no manifest.json"),
    "manifest-not-json": (lambda f: (f / "manifest.json").write_text("{"), "manifest.json is not valid JSON"),
    "kind-edited-to-base": (lambda f: _edit_manifest(f, kind="base"), "kind 'base'"),
    "kind-edited-to-adapter": (lambda f: _edit_manifest(f, kind="adapter"), "of kind 'adapter'"),
    "manifest-hashes-edited": (lambda f: _edit_manifest(f, weights_sha256={"model.safetensors": "0" * 64}),
                               "other weights than its manifest.json"),
    "stamp-not-json": (lambda f: (f / VALIDATED_STAMP).write_text("ok"), "VALIDATED is not valid JSON"),
    "stamp-hashes-removed": (lambda f: (f / VALIDATED_STAMP).write_text("{}"), "no whole-file weight hashes"),
    "shard-byte-flipped": (lambda f: flip_byte(first_shard(f)), "changed since it was validated"),
}


@pytest.mark.parametrize("link", BROKEN_LINKS)
def test_every_broken_link_of_a_stamped_merge_is_refused_as_a_base(sharded, tmp_path, link):
    folder = _stamped(sharded, tmp_path / "phasex_merged")
    breaks, message = BROKEN_LINKS[link]
    breaks(folder)
    with pytest.raises(UserError, match=message):
        require_validated(folder, allow_unvalidated=True)
    assert not stamp_is_current(folder)  # the demo validates again instead of reusing the stamp


@pytest.mark.parametrize("sign", ["merge_report.json", VALIDATED_STAMP, "adapter_config.json"])
def test_a_phase_output_without_manifest_needs_plain_base_to_be_a_base(sharded, tmp_path, sign):
    folder = Path(shutil.copytree(sharded, tmp_path / "looks_merged"))
    assert require_validated(folder) is None  # a plain model folder (a hub snapshot, a copy) passes as before
    (folder / sign).write_text("{}")
    with pytest.raises(UserError, match="no manifest.json") as err:
        require_validated(folder, allow_unvalidated=True)
    assert "PLAIN_BASE=1" in err.value.fix
    warning = require_validated(folder, plain_base=True)
    assert "PLAIN_BASE=1 given" in warning  # returned so training records it in the adapter's manifest


def test_a_quantized_candidate_with_its_hashes_is_validated_and_without_them_refused(sharded, tmp_path):
    """`make validate ARGS="--candidate <phase>_merged-nf4"` (README): the quantized copy records its hashes too."""
    import benchmark

    candidate = Path(shutil.copytree(sharded, tmp_path / "phasex_merged"))
    write_manifest(candidate, "quantized", source="x", weights_sha256=weights_sha256(candidate))
    assert benchmark.main(["--phase", str(_validate_config(tmp_path, candidate))]) == 0
    _edit_manifest(candidate, weights_sha256=None)
    with pytest.raises(UserError, match="no whole-file weight hashes") as err:
        benchmark.main(["--phase", str(_validate_config(tmp_path, candidate))])
    assert "FORCE=1 make quantize" in err.value.fix
