"""The ``cloudckpt`` command line, run as a subprocess against the local servers.

Each subprocess imports torch (seconds): independent commands run concurrently (``run_cli``
with several argument lists), and checkpoints are prepared in this process.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from backends import TEST_BUCKET, Backend, make_unique_prefix
from cases import assert_bitwise_equal

import cloudckpt
from cloudckpt import CheckpointerConfig, RetryConfig, StorageConfig, UploadConfig
from cloudckpt.cli import main as cli_main
from cloudckpt.manager import verify_checkpoint
from cloudckpt.manifest import MANIFEST_NAME, Manifest, rank_object_name
from cloudckpt.storage import Storage, get_storage, join_url

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST_RETRY = RetryConfig(max_attempts=2, initial_backoff_secs=0.01, max_backoff_secs=0.05)
SUBPROCESS_TIMEOUT_SECS = 240
SUBCOMMANDS = ["ls", "info", "verify", "restore", "cp", "prune", "gc", "local", "bench"]
PART_BYTES = 5 << 20


@dataclasses.dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def cli_env(*servers: Any, **extra: str) -> dict[str, str]:
    """This environment without store settings, plus the servers' (AWS_*, STORAGE_EMULATOR_HOST)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "STORAGE_EMULATOR_HOST", "GOOGLE_"))
    }
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    for server in servers:
        env.update(server.env)
    env.update(extra)
    return env


def run_cli(env: Mapping[str, str], *commands: Sequence[str]) -> list[Result]:
    """Run ``python -m cloudckpt.cli ARGS`` for each argument list, all at once."""
    procs = [
        (
            list(args),
            subprocess.Popen(
                [sys.executable, "-m", "cloudckpt.cli", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=dict(env),
                cwd=REPO_ROOT,
            ),
        )
        for args in commands
    ]
    results = []
    for args, proc in procs:
        try:
            out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_SECS)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"cloudckpt {args} timed out; stderr: {err}")
        results.append(Result(args, proc.returncode, out, err))
    return results


def assert_ok(result: Result) -> Result:
    assert result.returncode == 0, f"cloudckpt {result.args} failed: {result.stderr}"
    return result


def assert_one_line_error(result: Result, *fragments: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode != 0, result
    assert len(lines) == 1, f"cloudckpt {result.args}: expected one line, got {result.stderr!r}"
    assert lines[0].startswith("cloudckpt: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def storage_config(options: Mapping[str, Any]) -> StorageConfig:
    return StorageConfig(
        storage_options=dict(options),
        retry=FAST_RETRY,
        upload=UploadConfig(part_size_bytes=PART_BYTES, max_concurrency=2),
    )


@pytest.fixture
def ckpt(backend: Backend) -> Iterator[cloudckpt.SyncCheckpointer]:
    checkpointer = cloudckpt.make_sync_checkpointer(
        CheckpointerConfig(storage_options=backend.storage_options, retry_config=FAST_RETRY)
    )
    yield checkpointer
    checkpointer.close()


@pytest.fixture
def storage(backend: Backend) -> Iterator[Storage]:
    store = get_storage(backend.base_url, storage_config(backend.storage_options))
    yield store
    store.close()


def model_state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": collections.OrderedDict(  # what nn.Module.state_dict() returns
            [
                ("layer.weight", torch.randn(16, 8, generator=g)),
                ("embed", torch.randn(32, 4, generator=g).to(torch.bfloat16)),
            ]
        ),
        "optim": {"step": torch.tensor(seed, dtype=torch.int64), "lr": 0.1},
        "step": seed,
    }


def children(storage: Storage, url: str) -> set[str]:
    """Names of the "directories" directly under ``url`` that hold objects."""
    return {o.url[len(url) + 1 :].split("/")[0] for o in storage.list(url)}


def replace_object(storage: Storage, url: str, data: bytes) -> None:
    up = storage.open_upload(url)
    up.write(data)
    up.commit()


# --- help -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand_shows_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: cloudckpt {command}" in out
    assert "example:" in out and f"cloudckpt {command}" in out.split("example:")[1]


# --- ls / info --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_ls_and_info_of_a_known_checkpoint(
    backend: Backend, ckpt: cloudckpt.SyncCheckpointer, storage: Storage
) -> None:
    run = backend.url("run")
    for step in (1, 2):
        ckpt.save(join_url(run, f"step-{step}"), model_state(step), metadata={"epoch": step})
    storage.put_bytes(join_url(run, "step-3", rank_object_name(0)), b"crashed save")
    step2 = join_url(run, "step-2")
    size2 = storage.head(join_url(step2, rank_object_name(0))).size_bytes

    ls_json, ls_text, info_json, info_text = run_cli(
        cli_env(backend.server),
        ["ls", "--json", run],
        ["ls", run],
        ["info", "--json", step2],
        ["info", step2],
    )
    listing = assert_ok(ls_json).json()
    assert listing["prefix"] == run and listing["latest"] == "step-2"
    rows = [
        (c["name"], c["step"], c["committed"], c["ranks"], c["latest"])
        for c in listing["checkpoints"]
    ]
    assert rows == [
        ("step-1", 1, True, 1, False),
        ("step-2", 2, True, 1, True),
        ("step-3", 3, False, 1, False),
    ]
    sizes = {c["name"]: c["size_bytes"] for c in listing["checkpoints"]}
    assert sizes["step-2"] == sum(o.size_bytes for o in storage.list(step2))
    assert sizes["step-3"] == len(b"crashed save")
    assert listing["checkpoints"][2]["problem"] == "no manifest"

    text = assert_ok(ls_text).stdout.splitlines()
    assert text[0].split() == ["STEP", "NAME", "RANKS", "SIZE", "TIME", "STATUS"]
    assert text[2].startswith("*") and "step-2" in text[2] and "committed" in text[2]
    assert "uncommitted: no manifest" in text[3]
    assert "3 checkpoint(s), 2 committed" in text[4]

    info = assert_ok(info_json).json()
    assert info["url"] == step2 and info["world_size"] == 1 and info["objects"] == 1
    assert info["total_bytes"] == size2 and info["user_metadata"] == {"epoch": 2}
    assert info["torch_version"] == torch.__version__
    assert info["tool_version"] == cloudckpt.__version__ and info["format_version"] == 1
    (rank0,) = info["ranks"]
    assert rank0["object"] == "checkpoint_0.pt" and rank0["size_bytes"] == size2
    assert rank0["tensors"] == [
        {"key": "model.layer.weight", "dtype": "float32", "shape": [16, 8], "bytes": 512},
        {"key": "model.embed", "dtype": "bfloat16", "shape": [32, 4], "bytes": 256},
        {"key": "optim.step", "dtype": "int64", "shape": [], "bytes": 8},
    ]
    words = assert_ok(info_text).stdout
    assert "model.layer.weight  float32   [16, 8]" in words
    assert '{"epoch": 2}' in words and "3 tensor(s)" in words


# --- verify -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_verify_passes_on_good_and_fails_on_flipped_byte_and_missing_object(
    backend: Backend, ckpt: cloudckpt.SyncCheckpointer, storage: Storage
) -> None:
    good, flipped, missing = (backend.url("run", name) for name in ("good", "flipped", "missing"))
    for url in (good, flipped, missing):
        ckpt.save(url, model_state(1))
    manifest = Manifest.from_json(storage.get_bytes(join_url(flipped, MANIFEST_NAME)), url=flipped)
    layout = manifest.rank(0).layout
    span = next(layout.storage(t.storage_key) for t in layout.tensors if t.name == "model.embed")
    obj = join_url(flipped, rank_object_name(0))
    data = bytearray(storage.get_bytes(obj))
    data[span.offset + 1] ^= 0x10
    replace_object(storage, obj, bytes(data))
    storage.delete([join_url(missing, rank_object_name(0))])

    ok, bad, gone = run_cli(
        cli_env(backend.server),
        ["verify", good],
        ["verify", "--json", flipped],
        ["verify", missing],
    )
    assert_ok(ok)
    assert ok.stdout.startswith(f"OK {good}") and ok.stderr == ""
    assert bad.returncode == 1
    assert_one_line_error(bad, "verify failed", "checksum mismatch for key model.embed")
    report = bad.json()
    assert report["ok"] is False and report["url"] == flipped
    assert sorted(p["kind"] for p in report["problems"]) == ["checksum", "object_checksum"]
    checksum = next(p for p in report["problems"] if p["kind"] == "checksum")
    assert checksum["key"] == "model.embed" and checksum["rank"] == 0
    assert "rank 0" in checksum["message"] and checksum["object_url"] == obj
    assert gone.returncode == 1
    assert "[missing]" in gone.stdout and rank_object_name(0) in gone.stdout
    assert_one_line_error(gone, "verify failed", "missing")


# --- restore ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_restore_to_a_directory_and_to_plain_torch_files(
    backend: Backend, ckpt: cloudckpt.SyncCheckpointer, tmp_path: Path
) -> None:
    url = backend.url("run", "step-7")
    sd = model_state(7)
    ckpt.save(url, sd)
    dest, full, part = tmp_path / "step-7", tmp_path / "full.pt", tmp_path / "part.pt"

    to_dir, to_full, to_part = run_cli(
        cli_env(backend.server),
        ["restore", url, str(dest)],
        ["restore", url, "--to-torch", str(full)],
        ["restore", url, "--to-torch", str(part), "--keys", "model.layer.weight,optim"],
    )
    assert_ok(to_dir)
    assert "checksums verified" in to_dir.stdout
    assert_bitwise_equal(cloudckpt.make_sync_checkpointer().load(str(dest)), sd)
    from torch.distributed.checkpoint._experimental import CheckpointReader, RankInfo

    upstream, missing = CheckpointReader(RankInfo(global_rank=0, global_world_size=1)).read(
        str(dest)
    )
    assert missing == [] and upstream["step"] == 7
    assert_bitwise_equal(upstream, sd)

    assert_ok(to_full)
    assert_bitwise_equal(torch.load(full, weights_only=True), sd)
    assert_ok(to_part)
    expected = {
        "model": collections.OrderedDict([("layer.weight", sd["model"]["layer.weight"])]),
        "optim": sd["optim"],
    }
    assert_bitwise_equal(torch.load(part, weights_only=True), expected)


# --- cp ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_cp_s3_to_gcs_emulator_and_back(
    backend: Backend,
    ckpt: cloudckpt.SyncCheckpointer,
    gcs_server: Any,
    request: pytest.FixtureRequest,
) -> None:
    src = backend.url("run", "step-3")
    sd = {**model_state(3), "big": torch.randn(3 << 20)}  # 12 MiB: several parts and ranges
    ckpt.save(src, sd)
    gcs = f"gs://{TEST_BUCKET}/{make_unique_prefix(request.node.name)}/step-3"
    back = backend.url("run-copy", "step-3")
    env = cli_env(backend.server, gcs_server)

    (to_gcs,) = run_cli(env, ["cp", src, gcs])
    assert_ok(to_gcs)
    assert f"copied {src} to {gcs}" in to_gcs.stdout
    to_s3, verify_gcs, refused = run_cli(
        env, ["cp", gcs, back], ["verify", "--json", gcs], ["cp", src, gcs]
    )
    assert_ok(to_s3)
    assert assert_ok(verify_gcs).json()["ok"] is True
    assert_one_line_error(refused, "already exists", gcs)
    # what `cloudckpt verify` runs, in this process (one torch import less)
    assert verify_checkpoint(back, storage_config(backend.storage_options)).ok

    assert_bitwise_equal(ckpt.load(back), sd)
    gcs_reader = cloudckpt.CheckpointReader(
        storage_config=storage_config(gcs_server.storage_options)
    )
    assert_bitwise_equal(gcs_reader.read(gcs)[0], sd)
    manifest = gcs_reader.read_manifest(gcs)
    generation = gcs_reader.storage(gcs).head(join_url(gcs, rank_object_name(0))).version
    assert manifest.rank(0).version == generation  # the destination's version, not the source's
    gcs_reader.close()


# --- prune / gc -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_prune_and_gc_with_and_without_dry_run(
    backend: Backend, ckpt: cloudckpt.SyncCheckpointer, storage: Storage
) -> None:
    run = backend.url("run-a")
    for step in (1, 2, 3, 4):
        ckpt.save(join_url(run, f"step-{step}"), model_state(step))
    ckpt.save(backend.url("run-ab", "step-1"), model_state(1))
    storage.put_bytes(join_url(run, "step-5", rank_object_name(0)), b"crashed save")
    crashed = storage.open_upload(join_url(run, "step-6", rank_object_name(0)))
    crashed.write(os.urandom(PART_BYTES + 1))  # a pending multipart upload
    env = cli_env(backend.server)
    try:
        prune_dry, gc_dry = run_cli(
            env,
            ["prune", run, "--keep", "2", "--protect", "step-1", "--dry-run", "--json"],
            ["gc", run, "--older-than", "0s", "--dry-run", "--json"],
        )
        assert [c["name"] for c in assert_ok(prune_dry).json()["deleted"]] == ["step-2"]
        dry = assert_ok(gc_dry).json()
        assert dry["dry_run"] is True
        assert [u["url"] for u in dry["aborted_uploads"]] == [crashed.url]
        assert [c["name"] for c in dry["deleted_checkpoints"]] == ["step-5"]
        assert len(storage.list_pending_uploads(run)) == 1
        assert children(storage, run) == {"step-1", "step-2", "step-3", "step-4", "step-5"}

        (prune,) = run_cli(env, ["prune", run, "--keep", "2"])
        lines = assert_ok(prune).stdout.splitlines()
        assert lines[0].startswith("deleted step-1 (step 1, ")
        assert lines[1].startswith("deleted step-2 (step 2, ")
        assert lines[2].startswith(f"deleted 2 checkpoint(s) under {run}")
        (gc,) = run_cli(env, ["gc", run, "--older-than", "0s"])
        assert f"abort upload {crashed.upload_id} of {crashed.url}" in assert_ok(gc).stdout
        assert "delete uncommitted step-5 (step 5, 12 B): no manifest" in gc.stdout
        assert storage.list_pending_uploads(run) == []
        assert children(storage, run) == {"step-3", "step-4"}
        assert storage.exists(backend.url("run-ab", "step-1", MANIFEST_NAME))
    finally:
        crashed.abort()


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["seaweedfs"], indirect=True)
def test_bad_input_gives_one_line_errors(
    backend: Backend, storage: Storage, tmp_path: Path
) -> None:
    env = cli_env(backend.server)
    results = run_cli(
        env,
        ["ls", "ftp://host/run"],
        ["ls", "s3://no-such-bucket-cloudckpt/run"],
        ["--storage-option", "secret=definitely-wrong", "ls", backend.url("run")],
        ["info", backend.url("run", "never-saved")],
        ["gc", backend.url("run"), "--older-than", "soon"],
        ["local", "status", "--state-file", str(tmp_path / "no-state.json")],
        ["bench", backend.url("bench"), "--size", "6MiB", "--json"],
        ["--help"],
    )
    scheme, bucket, creds, no_ckpt, usage, local, bench, top_help = results
    assert_one_line_error(scheme, "unsupported URL scheme 'ftp'")
    assert scheme.returncode == 2
    assert_one_line_error(bucket, "no-such-bucket-cloudckpt")
    assert bucket.returncode == 1
    assert_one_line_error(creds, TEST_BUCKET)
    assert creds.returncode == 1
    assert_one_line_error(no_ckpt, "no committed checkpoint", "never-saved")
    assert_one_line_error(usage, "invalid duration 'soon'")
    assert usage.returncode == 2
    assert local.returncode == 1 and "not running" in local.stderr  # the launcher answered
    doc = assert_ok(bench).json()
    assert doc["size_bytes"] == 6 << 20 and doc["save_mib_per_sec"] > 0
    assert doc["load_mib_per_sec"] > 0
    assert doc["url"].startswith(backend.url("bench"))
    assert storage.list(backend.url("bench")) == []  # cleaned up after itself
    assert "example:" in assert_ok(top_help).stdout


def test_storage_options_from_flags_and_environment() -> None:
    from cloudckpt.cli.options import StorageOptions, parse_storage_option

    flags = [
        parse_storage_option(text)
        for text in ("anon=true", "s3.endpoint_url=http://s3:1", "gs.token=abc", "retries=3")
    ]
    env = {
        "AWS_ENDPOINT_URL": "http://env:9",
        "AWS_ACCESS_KEY_ID": "K",
        "AWS_SECRET_ACCESS_KEY": "S",
        "STORAGE_EMULATOR_HOST": "127.0.0.1:4443",
        "GOOGLE_CLOUD_PROJECT": "p",
    }
    options = StorageOptions.from_flags(flags, env=env)
    assert options.options_for("s3://b/k") == {
        "endpoint_url": "http://s3:1",
        "key": "K",
        "secret": "S",
        "anon": True,
        "retries": 3,
    }
    assert options.options_for("gs://b/k") == {
        "endpoint_url": "http://127.0.0.1:4443",
        "token": "abc",
        "project": "p",
        "anon": True,
        "retries": 3,
    }
    assert options.options_for("/local/dir") == {}
    assert StorageOptions.from_flags([], env={}).options_for("s3://b") == {}


def test_keys_resolve_in_the_spelling_info_prints() -> None:
    from cloudckpt.cli.commands import resolve_key

    structure = {
        "model": collections.OrderedDict([("layer.weight", 1), ("layer", {"x": 2})]),
        "optim": {"state": {0: {"exp_avg": 3}}},
        "list": [4],
    }
    assert resolve_key(structure, "model.layer.weight") == ("model", "layer.weight")
    assert resolve_key(structure, "model.layer.x") == ("model", "layer", "x")
    assert resolve_key(structure, "optim.state[0].exp_avg") == ("optim", "state", 0, "exp_avg")
    assert resolve_key(structure, "list") == ("list",)
    with pytest.raises(ValueError, match="list is a list, not a dict"):
        resolve_key(structure, "list[0]")
    with pytest.raises(ValueError, match=r"'model.nope' is not in the checkpoint \(model has"):
        resolve_key(structure, "model.nope")


def test_duration_and_size_parsing() -> None:
    import argparse

    from cloudckpt.cli.options import parse_duration_secs, parse_size_bytes

    assert [parse_duration_secs(t) for t in ("90s", "30m", "2h", "7d", "1h30m", "15")] == [
        90,
        1800,
        7200,
        604800,
        5400,
        15,
    ]
    assert parse_size_bytes("256MiB") == 256 << 20 and parse_size_bytes("1GB") == 10**9
    for bad in ("", "2x", "h", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration_secs(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size_bytes("lots")


def test_progress_bar_renders_bytes_rate_and_eta() -> None:
    from cloudckpt.cli.output import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar("restore", 100 << 20, enabled=True, stream=stream)
    bar.done_bytes = 25 << 20
    text = bar.render(bar._started + 1.0)
    assert text.startswith("restore [######")
    assert "25.0 MiB/100.0 MiB" in text and "25.0 MiB/s" in text and "ETA 0:03" in text
    bar.close()
    assert stream.getvalue().endswith("\n")
    silent = io.StringIO()
    off = ProgressBar("x", 10, enabled=False, stream=silent)
    off.update(5)
    off.close()
    assert silent.getvalue() == ""
