"""Output folders: --overwrite never destroys what the user owns; swaps are atomic; leftovers are cleaned."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adasvd_lightning import load_compressed, save_compressed
from adasvd_lightning.cli import main
from adasvd_lightning.core import output
from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.core.output import MARKER, OutputWarning, clean_stale_temporaries
from conftest import tiny_model

COMPRESS = ["--ratio", "0.4", "--samples", "4", "--seq-len", "16", "--quiet"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _compress(model: Path, out, *extra: str) -> int:
    return main(["compress", "--model", str(model), *COMPRESS, "--out", str(out), *extra])


@pytest.fixture
def user_tree(tiny_reference, tmp_path) -> Path:
    """tmp/home/{notes.txt, models/{model (a real model folder), readme.txt}} — all the user's."""
    home = tmp_path / "home"
    shutil.copytree(tiny_reference, home / "models" / "model")
    (home / "models" / "readme.txt").write_text("mine")
    (home / "notes.txt").write_text("also mine")
    return home


@pytest.mark.parametrize("target", ["models/model", "models", ".", "elsewhere"])
def test_overwrite_never_replaces_the_input_its_parents_or_user_folders(user_tree, target, capsys):
    other = user_tree.parent / "elsewhere"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    out = other if target == "elsewhere" else user_tree / target
    before = {p: _snapshot(p) for p in (user_tree, other)}
    assert _compress(user_tree / "models" / "model", out, "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("input" in err or "not written by adasvd" in err), err
    assert {p: _snapshot(p) for p in (user_tree, other)} == before


def test_empty_out_and_working_directory_are_refused(user_tree, monkeypatch, capsys):
    work = user_tree.parent / "work"
    work.mkdir()
    (work / "data.txt").write_text("the user's")
    monkeypatch.chdir(work)
    for out in ("", ".", "../work"):
        assert _compress(user_tree / "models" / "model", out, "--overwrite") == 2
        err = capsys.readouterr().err
        assert ("empty" in err) if out == "" else ("working directory" in err), err
    assert _snapshot(work) == {"data.txt": b"the user's"}


def test_only_an_unmodified_output_of_this_project_is_replaced(tmp_path):
    out = save_compressed(tiny_model("llama"), tmp_path / "out")
    assert json.loads((out / MARKER).read_text())["complete"] is True
    save_compressed(tiny_model("llama", seed=1), out, overwrite=True)  # ours: replaced
    (out / "my-eval-notes.txt").write_text("user file")
    with pytest.raises(InvalidInputError, match="files adasvd did not write.*my-eval-notes.txt"):
        save_compressed(tiny_model("llama"), out, overwrite=True)
    assert (out / "my-eval-notes.txt").read_text() == "user file"
    symlink = tmp_path / "link"
    symlink.symlink_to(out)
    with pytest.raises(InvalidInputError, match="symbolic link"):
        save_compressed(tiny_model("llama"), symlink, overwrite=True)


def test_a_stale_backup_name_does_not_break_a_later_run(tmp_path):
    """At cafbb3f a leftover ``.out.old-<pid>`` made the swap fail after all the work."""
    model = tiny_model("llama")
    save_compressed(model, tmp_path / "out")
    stale = tmp_path / f".out.old-{os.getpid()}"
    stale.mkdir()
    (stale / "x").write_text("someone's")
    save_compressed(tiny_model("llama", seed=1), tmp_path / "out", overwrite=True)
    assert load_compressed(tmp_path / "out") is not None
    assert (stale / "x").read_text() == "someone's"  # not ours: left alone


def test_stale_temporaries_are_cleaned_with_a_message_and_live_ones_kept(tmp_path):
    save_compressed(tiny_model("llama"), tmp_path / "out")
    stale = tmp_path / ".out.adasvd-tmp-0123abcd"
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"writer": "adasvd-lightning", "complete": False, "files": []}))
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / ".out.adasvd-tmp-feedbeef"
    live.mkdir()
    (live / MARKER).write_text(json.dumps({"writer": "adasvd-lightning", "complete": False, "files": []}))
    lock = output._lock(live)  # a run that is still writing
    foreign = tmp_path / ".out.adasvd-tmp-notours"
    foreign.mkdir()
    (foreign / "data").write_text("x")
    try:
        with pytest.warns(OutputWarning, match="removed .*adasvd-tmp-0123abcd"):
            save_compressed(tiny_model("llama", seed=1), tmp_path / "out", overwrite=True)
    finally:
        output._unlock(lock)
    assert not stale.exists() and live.exists() and foreign.exists()


def test_fallback_swap_and_restore_of_a_cut_swap(tmp_path, monkeypatch):
    """Without renameat2 the swap goes through an -old- sibling; a run killed between its renames
    leaves the destination missing, and the next run puts the old output back."""
    monkeypatch.setattr(output, "_renameat2", lambda *a: False)
    out = save_compressed(tiny_model("llama"), tmp_path / "out")
    save_compressed(tiny_model("llama", seed=1), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    kept = _snapshot(out)
    os.rename(out, tmp_path / ".out.adasvd-old-5ca1ab1e")  # the state after the first rename
    with pytest.warns(OutputWarning, match="restored"):
        assert clean_stale_temporaries(out)
    assert _snapshot(out) == kept


def test_outputs_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        out = save_compressed(tiny_model("llama"), tmp_path / "out")
        assert out.stat().st_mode & 0o777 == 0o755
        assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}
        save_compressed(tiny_model("llama", seed=1), out, overwrite=True)
        assert out.stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(previous)


# --- a real `adasvd compress --overwrite` killed at several points ----------------------------------

# The child runs the real CLI and SIGKILLs itself at a chosen point of the write (fault injection
# around the functions that mark each point; nothing of the output code is replaced). Polling the
# folder from outside instead raced the child on a loaded machine.
_KILL_CHILD = """
import os, signal, sys
import safetensors.torch
from adasvd_lightning.core import output
from adasvd_lightning.cli import main

def die():
    os.kill(os.getpid(), signal.SIGKILL)

point = sys.argv[1]

def after(module, name, when=lambda *a, **k: True):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            die()
        return result
    setattr(module, name, wrapper)

if point == "temporary folder created":
    after(output, "_write_marker", lambda folder, complete: not complete)
elif point == "weights half written":
    def half(tensors, filename, *args, **kwargs):
        original_save(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        die()
    original_save = safetensors.torch.save_file
    safetensors.torch.save_file = half
elif point == "everything written, before the swap":
    after(output, "_write_marker", lambda folder, complete: complete)
elif point == "just after the swap":
    after(output, "_renameat2")
sys.exit(main(sys.argv[2:]))
"""

KILL_POINTS = ("temporary folder created", "weights half written", "everything written, before the swap",
               "just after the swap")


def test_sigkill_during_compress_overwrite_keeps_the_previous_output(tiny_reference, tmp_path):
    out = tmp_path / "out"
    assert _compress(tiny_reference, out) == 0
    previous = _snapshot(out)
    args = ["compress", "--model", str(tiny_reference), "--ratio", "0.6", "--samples", "4", "--seq-len", "16",
            "--quiet", "--out", str(out), "--overwrite"]
    for point in KILL_POINTS:
        proc = subprocess.run([sys.executable, "-c", _KILL_CHILD, point, *args], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        if point == "just after the swap":  # the swap happened: the complete new output is in place
            assert json.loads((out / MARKER).read_text())["complete"]
            assert json.loads((out / "config.json").read_text())["quantization_config"]["ratio"] == 0.6
        else:
            assert _snapshot(out) == previous, point  # untouched, byte for byte
        assert load_compressed(out) is not None
        assert any(".adasvd-tmp-" in p.name for p in tmp_path.iterdir()), point  # debris to clean
    rerun = subprocess.run([sys.executable, "-m", "adasvd_lightning", *args], capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "interrupted run" in rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ratio"] == 0.6
    with torch.no_grad():
        assert torch.isfinite(load_compressed(out)(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.skipif(subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode != 0,
                    reason="needs unprivileged user+mount namespaces")
def test_disk_full_during_the_write_is_one_error_and_leaves_nothing(tmp_path):
    """A 64 KB tmpfs: the write itself runs out of space (the up-front estimate was beaten)."""
    where = tmp_path / "small"
    where.mkdir()
    code = ("import sys; from pathlib import Path\n"
            "from adasvd_lightning.core.errors import InvalidInputError\n"
            "from adasvd_lightning.core.output import atomic_directory\n"
            "try:\n"
            "    with atomic_directory(sys.argv[1]) as tmp:\n"
            "        (tmp / 'weights.bin').write_bytes(bytes(1 << 20))\n"
            "except InvalidInputError as exc:\n"
            "    print(exc); print(sorted(p.name for p in Path(sys.argv[1]).parent.iterdir()))\n"
            "    raise SystemExit(2)\n")
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1" && shift && '
                             'exec "$@"', "sh", str(where), sys.executable, "-c", code,
                             str(where / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    message, left = result.stdout.strip().splitlines()
    assert "disk full while writing" in message and left == "[]"


def test_an_output_that_appears_during_the_run_is_left_alone(tmp_path):
    from adasvd_lightning.core.output import atomic_directory

    with pytest.raises(InvalidInputError, match="appeared while this run was writing"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "weights.bin").write_bytes(b"new")
            (tmp_path / "out").mkdir()  # another process (or the user) got there first
            (tmp_path / "out" / "theirs.txt").write_text("theirs")
    assert _snapshot(tmp_path / "out") == {"theirs.txt": b"theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
