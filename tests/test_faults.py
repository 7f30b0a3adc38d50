"""Faults of the machine and of the data: a read-only output folder, a disk that fills up while saving, temporaries
left by writes killed mid-way, a dataset with one cell type. Each is a one-line error (or a cleaned folder), never a
traceback, and nothing is left half-written."""
import errno
import os
import re
import shutil
import tempfile

import numpy as np
import torch

import training
from conftest import TINY, run_script, state, user_error, write_h5ad


def tiny_run(baron, out, *extra, check=True):
    return run_script('train.py', f'--dataset={baron}', *TINY, f'--out_dir={out}', '--baseline=False', *extra,
                      check=check)


def test_read_only_output_folder_is_refused_before_any_work(baron, tmp_path, monkeypatch):
    read_only = tmp_path / 'ro'
    read_only.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):                  # a read-only file system, as seen by a write
        if dir is not None and str(dir).startswith(str(read_only)):
            raise OSError(errno.EROFS, 'Read-only file system')
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, 'mkstemp', mkstemp)
    result = tiny_run(baron, read_only / 'out', '--max_iters=2', check=False)
    user_error(result, rf'cannot write in {re.escape(str(read_only))} \(the file system is read-only\), where '
                       rf'--out_dir=.* goes; choose a writable --out_dir')
    assert 'fold 0' not in result.stdout and not (read_only / 'out').exists()      # no training, nothing made
    (tmp_path / 'a_file').write_text('x')
    user_error(tiny_run(baron, tmp_path / 'a_file' / 'out', check=False), 'is a file, not a folder')
    if os.geteuid() != 0:                                     # (root writes in a read-only folder regardless)
        os.chmod(read_only, 0o500)
        user_error(tiny_run(baron, read_only / 'out', check=False), 'permission denied')


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(baron, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    real, calls = torch.save, []

    def save(obj, path, *args, **kwargs):                     # the third save finds the disk full, half-way
        calls.append(path)
        if len(calls) == 3:
            with open(path, 'wb') as f:
                f.write(b'PK\x03\x04 half a checkpoint')
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 1216 vs 1110')
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save)
    result = tiny_run(baron, out, '--max_iters=6', '--eval_interval=2', check=False)
    user_error(result, r'cannot write .*\.pt: torch\.save failed \(.*unexpected pos.*\); [0-9,]+ MiB free on its disk, '
                       r'about [0-9.]+ MiB needed; free some space')
    assert state(out / 'ckpt.pt')['iter_num'] == 0            # the one before: intact
    assert not [p for p in os.listdir(out) if '.tmp-' in p]   # no temporary left
    # the same failure with the disk really nearly full says so
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=1000))
    calls.clear()
    user_error(tiny_run(baron, tmp_path / 'nearly_full', '--max_iters=6', '--eval_interval=2', check=False),
               r'cannot write .*\.pt: the disk is full; 0 MiB free on its disk, about [0-9.]+ MiB needed')
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage)
    # an OSError from the file system (ENOSPC) says the disk is full
    monkeypatch.setattr(torch, 'save', lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, 'No space')))
    user_error(tiny_run(baron, tmp_path / 'full', '--max_iters=2', check=False), r'best\.pt: the disk is full')


def test_resume_removes_the_temporaries_of_killed_writes(baron, tmp_path):
    out = tmp_path / 'out'
    tiny_run(baron, out, '--max_iters=6', '--eval_interval=2', '--stop_iter=3')
    dead = 2 ** 22 + 12345                                    # above the default pid_max: no such process
    (out / f'ckpt.pt.tmp-{dead}').write_bytes(b'half')
    (out / f'best.pt.tmp-{dead}').write_bytes(b'half')
    (out / f'ckpt.pt.tmp-{os.getpid()}x').write_bytes(b'not ours')   # not an atomic_write name: kept
    result = tiny_run(baron, out, '--max_iters=6', '--eval_interval=2', '--init_from=resume')
    assert f'removed 2 temporary file(s) that killed writes left in {out}' in result.stdout
    assert sorted(p for p in os.listdir(out) if '.tmp-' in p) == [f'ckpt.pt.tmp-{os.getpid()}x']
    assert state(out / 'ckpt.pt')['done']


def test_one_cell_type_cannot_be_fine_tuned(tmp_path):
    counts = np.random.default_rng(0).poisson(2.0, (40, 30)).astype(np.float32)
    write_h5ad(tmp_path / 'one.h5ad', counts, [f'Gene{i}' for i in range(30)], obs={'cell_type': ['beta'] * 40})
    run_script('prepare_data.py', f'--input={tmp_path / "one.h5ad"}', f'--out_dir={tmp_path / "one"}',
               '--label_key=cell_type', '--min_genes=0', '--n_folds=2')
    result = run_script('train.py', f'--dataset={tmp_path / "one"}', *TINY, f'--out_dir={tmp_path / "o"}',
                        check=False)
    user_error(result, "every labelled cell of .* is 'beta': one cell type leaves nothing to learn")
    assert not (tmp_path / 'o').exists()
    run_script('train.py', f'--dataset={tmp_path / "one"}', *TINY, f'--out_dir={tmp_path / "p"}', '--mode=pretrain',
               '--max_iters=2')                               # pretraining needs no labels


def test_write_failure_names_the_reason():
    assert 'the disk is full' in training.write_failure('/tmp/x.pt', OSError(errno.ENOSPC, 'No space'))
    assert 'about 1.0 MiB needed' in training.write_failure('/tmp/x.pt', OSError(None, 'failed'), 2 ** 20)
