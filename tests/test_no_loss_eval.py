"""Nothing evaluate.py does loses or mixes a user's work (issue 19, evaluation side): outputs never replace inputs,
`export` writes only into a new or empty folder, the `fid --snapshots` cache is keyed by what made each number, and
bad inputs or unwritable outputs end in one line naming the file or flag, before any compute where they can."""

import copy
import errno
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import evaluate
import fixtures
import rundir
from test_evaluate import TinyDetector, randomized, write_pngs, write_run

def one_line_error(argv, match):
    with pytest.raises(SystemExit, match=match) as error:
        evaluate.main(argv)
    assert '\n' not in str(error.value) and 'Traceback' not in str(error.value)
    return str(error.value)

@pytest.fixture
def no_compute(monkeypatch):
    # An input refused "before compute" is refused before the detector or any network is loaded.
    def refuse(*args, **kwargs):
        raise AssertionError('computed before the input was checked')
    monkeypatch.setattr(evaluate, 'load_detector', refuse)
    monkeypatch.setattr(evaluate, 'load_source', refuse)

def file_bytes(path):
    with open(path, 'rb') as f:
        return f.read()

#----------------------------------------------------------------------------
# export: only into a new or empty folder.

def test_export_refuses_a_folder_that_is_not_new_or_empty(tmp_path):
    nets = write_run(tmp_path)
    ckpt = os.path.join(nets['run'], 'checkpoint-0000010.pt')
    project = tmp_path / 'project'                                    # `--dest .` inside a project
    os.makedirs(project)
    (project / 'README.md').write_text('# my project\n')
    message = one_line_error(['export', '--ckpt', nets['run'], '--dest', str(project)], f'--dest "{project}" is not empty: it holds 1 other file')
    assert 'README.md' in message and 'new or empty folder' in message
    assert (project / 'README.md').read_text() == '# my project\n' and os.listdir(project) == ['README.md']
    # An SD export's folder (its files written here by name): an EDM export does not go in and mix with it.
    sd_export = tmp_path / 'sd-export'
    os.makedirs(sd_export)
    for name in ('README.md', 'config.json', 'diffusion_pytorch_model.safetensors'):
        (sd_export / name).write_text(name)
    one_line_error(['export', '--ckpt', ckpt, '--dest', str(sd_export)], 'holds an SD export, and this EDM run cannot go there')
    assert sorted(os.listdir(sd_export)) == ['README.md', 'config.json', 'diffusion_pytorch_model.safetensors']
    # Its own export of the same kind is refused too (the checkpoint it came from may have been rotated away).
    evaluate.main(['export', '--ckpt', ckpt, '--dest', str(tmp_path / 'edm-export')])
    before = {name: file_bytes(tmp_path / 'edm-export' / name) for name in os.listdir(tmp_path / 'edm-export')}
    one_line_error(['export', '--ckpt', ckpt, '--dest', str(tmp_path / 'edm-export')], 'holds an EDM export of the same kind')
    assert {name: file_bytes(tmp_path / 'edm-export' / name) for name in before} == before
    # An empty folder is fine; the checkpoint itself and its run directory are inputs.
    os.makedirs(tmp_path / 'empty')
    evaluate.main(['export', '--ckpt', ckpt, '--dest', str(tmp_path / 'empty')])
    assert sorted(os.listdir(tmp_path / 'empty')) == ['README.md', 'generator.json', 'generator.safetensors']
    one_line_error(['export', '--ckpt', ckpt, '--dest', ckpt], 'is an existing file, not a folder')
    one_line_error(['export', '--ckpt', ckpt, '--dest', nets['run']], 'would be written over the run directory of --ckpt')

#----------------------------------------------------------------------------
# No output over an input: paths compared after resolving links.

def test_no_command_writes_over_its_inputs(tmp_path, no_compute):
    nets = write_run(tmp_path)
    data = fixtures.write_dataset_zip(str(tmp_path / 'D.zip'), num=4, resolution=16)
    detector = str(tmp_path / 'detector.pt')
    torch.jit.script(TinyDetector(8)).save(detector)
    alias = tmp_path / 'alias'
    os.symlink(tmp_path, alias)                                        # the same folder by another name
    kept = {path: file_bytes(path) for path in (data, detector)}
    one_line_error(['ref', '--data', data, '--dest', data, '--detector', detector], '--dest: ".*D.zip" would be written over --data ".*D.zip", an input of this command: pass another --dest')
    one_line_error(['ref', '--data', data, '--dest', str(alias / 'D.zip'), '--detector', detector], 'over --data')
    one_line_error(['ref', '--data', data, '--dest', detector, '--detector', detector], 'over --detector')
    np.savez(str(tmp_path / 'ref.npz'), mu=np.zeros(8), sigma=np.eye(8))
    kept[str(tmp_path / 'ref.npz')] = file_bytes(tmp_path / 'ref.npz')
    common = ['fid', '--ckpt', nets['run'], '--ref', str(tmp_path / 'ref.npz'), '--detector', detector, '--num-images', '4', '--no-pr']
    for flag, path in (('--ref', str(tmp_path / 'ref.npz')), ('--detector', detector)):
        one_line_error([*common, '--report', path], f'--report: ".*" would be written over {flag}')
    checkpoint = os.path.join(nets['run'], 'checkpoint-0000010.pt')
    kept[checkpoint] = file_bytes(checkpoint)
    one_line_error([*common, '--report', str(alias / 'run' / 'checkpoint-0000010.pt')], '--report: ".*" would be written over the checkpoint')
    one_line_error(['generate', '--ckpt', nets['run'], '--outdir', nets['run']], '--outdir: ".*run" would be written over --ckpt')
    one_line_error(['generate', '--ckpt', checkpoint, '--outdir', checkpoint], 'is an existing file, not a folder')
    one_line_error(['export', '--ckpt', checkpoint, '--dest', checkpoint], 'is an existing file')
    assert all(file_bytes(path) == content for path, content in kept.items())

def test_plot_never_writes_over_the_run(tmp_path):
    run = tmp_path / 'run'
    os.makedirs(run)
    lines = [json.dumps(dict(iteration=i, loss_fdistill=1.0 / (i + 1), images_per_sec=10.0 + i)) for i in range(4)]
    (run / 'stats.jsonl').write_text('\n'.join(lines) + '\n')
    stats = file_bytes(run / 'stats.jsonl')
    one_line_error(['plot', '--ckpt', str(run), '--outdir', str(run / 'stats.jsonl')], 'is an existing file, not a folder')
    os.makedirs(tmp_path / 'out')
    os.symlink(run / 'stats.jsonl', tmp_path / 'out' / 'losses.png')   # an output name that is the log by a link
    one_line_error(['plot', '--ckpt', str(run), '--outdir', str(tmp_path / 'out')], '--outdir: ".*losses.png" would be written over the run\'s stats.jsonl')
    assert file_bytes(run / 'stats.jsonl') == stats
    evaluate.main(['plot', '--ckpt', str(run)])
    assert sorted(os.listdir(run / 'plots')) == ['losses.png', 'speed.png'] and file_bytes(run / 'stats.jsonl') == stats

#----------------------------------------------------------------------------
# fid --snapshots: the cache is keyed by everything that makes a number; the weights scored are named.

@pytest.fixture
def no_png(monkeypatch):
    # fid-snapshots.png is tested in test_scale.py; here only the numbers and the cache, without matplotlib's seconds.
    monkeypatch.setattr(evaluate, 'fid_figure', lambda entries, best: None)
    monkeypatch.setattr(evaluate, 'save_figure', lambda fig, path: None)

def write_snapshots(tmp_path):
    nets = write_run(tmp_path)
    ckpt = torch.load(os.path.join(nets['run'], 'checkpoint-0000010.pt'), map_location='cpu', weights_only=True)
    ema = randomized(copy.deepcopy(nets['generator']), 0.3)
    # Snapshot 0 has no EMA (its raw generator is scored), snapshot 10 keeps one (its EMA is scored).
    rundir.save_checkpoint(os.path.join(nets['run'], 'snapshot-0000000.pt'), dict(ckpt, iteration=0, generator=nets['teacher'].state_dict(), generator_ema=None))
    rundir.save_checkpoint(os.path.join(nets['run'], 'snapshot-0000010.pt'), dict(ckpt, generator_ema=ema.state_dict()))
    os.remove(os.path.join(nets['run'], 'checkpoint-0000010.pt'))
    # The EMA as a checkpoint's only generator: `fid --ckpt` of it is the number the EMA must get.
    rundir.save_checkpoint(str(tmp_path / 'ema-only.pt'), dict(ckpt, generator=ema.state_dict(), generator_ema=None))
    rundir.save_checkpoint(str(tmp_path / 'raw-only.pt'), dict(ckpt, generator_ema=None))
    torch.jit.script(TinyDetector(8)).save(str(tmp_path / 'detector.pt'))
    write_pngs(str(tmp_path / 'data'), 8)
    evaluate.main(['ref', '--data', str(tmp_path / 'data'), '--dest', str(tmp_path / 'ref.npz'), '--detector', str(tmp_path / 'detector.pt')])
    return nets['run']

def fid_of(tmp_path, ckpt, seeds):
    report = str(tmp_path / 'one.json')
    evaluate.main(['fid', '--ckpt', ckpt, '--ref', str(tmp_path / 'ref.npz'), '--detector', str(tmp_path / 'detector.pt'), '--seeds', seeds, '--no-pr', '--report', report])
    return json.load(open(report))['sets'][0]['fid']

def test_fid_snapshots_cache_is_keyed_by_what_made_each_number(tmp_path, capsys, monkeypatch, no_png):
    run = write_snapshots(tmp_path)
    cache = os.path.join(run, 'fid-snapshots.json')
    snapshots = ['fid', '--ckpt', run, '--snapshots', '--ref', str(tmp_path / 'ref.npz'), '--detector', str(tmp_path / 'detector.pt'), '--no-pr']
    loads = []
    load_checkpoint = evaluate.load_checkpoint
    def counted(path):                                                 # the snapshots loaded to be scored (not the run's latest, read to check it)
        if os.path.isfile(path):
            loads.append(os.path.basename(path))
        return load_checkpoint(path)
    monkeypatch.setattr(evaluate, 'load_checkpoint', counted)

    def score(seeds):
        loads.clear()
        evaluate.main([*snapshots, '--seeds', seeds])
        return {e['iteration']: e for e in json.load(open(cache))['snapshots']}, list(loads)

    entries, scored = score('0-3')
    assert scored == ['snapshot-0000000.pt', 'snapshot-0000010.pt']
    assert entries[0]['weights'] == 'generator' and entries[10]['weights'] == 'generator_ema'
    best = json.load(open(cache))['best']
    assert best['weights'] == entries[best['iteration']]['weights']
    assert 'generator_ema weights' in capsys.readouterr().out
    # The numbers are those of the weights named: the EMA of snapshot 10 scores as a checkpoint holding only it.
    ema_fid, raw_fid = fid_of(tmp_path, str(tmp_path / 'ema-only.pt'), '0-3'), fid_of(tmp_path, str(tmp_path / 'raw-only.pt'), '0-3')
    assert entries[10]['fid'] == pytest.approx(ema_fid, rel=1e-9) and abs(ema_fid - raw_fid) > 1e-3 * ema_fid
    assert score('0-3')[1] == []                                       # nothing changed: all reused
    # Other seeds of the same count: every snapshot scored again, on those seeds.
    entries, scored = score('4-7')
    assert scored == ['snapshot-0000000.pt', 'snapshot-0000010.pt']
    assert entries[10]['fid'] == pytest.approx(fid_of(tmp_path, str(tmp_path / 'ema-only.pt'), '4-7'), rel=1e-9)
    # Another detector at the same path: scored again. (A rewrite changes the file's time; set apart by 1 s here so
    # that file systems with coarse timestamps see it too.)
    torch.manual_seed(5)
    torch.jit.script(TinyDetector(8)).save(str(tmp_path / 'detector.pt'))
    st = os.stat(tmp_path / 'detector.pt')
    os.utime(tmp_path / 'detector.pt', ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    entries, scored = score('4-7')
    assert len(scored) == 2 and 'was made with other detector: scoring every snapshot again' in capsys.readouterr().out
    # The reference rebuilt at the same path (with the new detector): scored again.
    evaluate.main(['ref', '--data', str(tmp_path / 'data'), '--dest', str(tmp_path / 'ref.npz'), '--detector', str(tmp_path / 'detector.pt')])
    st = os.stat(tmp_path / 'ref.npz')
    os.utime(tmp_path / 'ref.npz', ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    entries, scored = score('4-7')
    assert len(scored) == 2 and 'was made with other ref: scoring every snapshot again' in capsys.readouterr().out
    # One snapshot rewritten: that one alone is scored again.
    path = os.path.join(run, 'snapshot-0000000.pt')
    state = rundir.load_checkpoint(path)
    rundir.save_checkpoint(path, dict(state, generator=state['fake_score']))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    new, scored = score('4-7')
    assert scored == ['snapshot-0000000.pt'] and new[10] == entries[10] and new[0]['fid'] != entries[0]['fid']

def test_fid_snapshots_rebuilds_a_cache_it_cannot_read(tmp_path, capsys, no_png):
    run = write_snapshots(tmp_path)
    os.remove(os.path.join(run, 'snapshot-0000000.pt'))                # one snapshot is enough here
    cache = os.path.join(run, 'fid-snapshots.json')
    argv = ['fid', '--ckpt', run, '--snapshots', '--ref', str(tmp_path / 'ref.npz'), '--detector', str(tmp_path / 'detector.pt'), '--no-pr', '--seeds', '0-3']
    evaluate.main(argv)
    good = json.load(open(cache))
    old_format = dict(snapshots=[dict(e, fid=0.5) for e in good['snapshots']], best=good['best'], ref=good['ref'])   # before schema 2
    for damaged in (b'{"snapshots": [', b'\x00\xff\xfe garbage', json.dumps(dict(good, snapshots=[dict(fid='x')])).encode(), json.dumps(old_format).encode()):
        with open(cache, 'wb') as f:
            f.write(damaged)
        capsys.readouterr()
        evaluate.main(argv)
        out = capsys.readouterr().out
        assert f'{cache} cannot be read' in out and 'rebuilding it' in out and 'Traceback' not in out
        assert json.load(open(cache))['snapshots'] == good['snapshots']

#----------------------------------------------------------------------------
# Bad inputs: one line naming the file and the fix, before compute.

def test_bad_reference_npz_is_one_line_before_compute(tmp_path, no_compute):
    write_pngs(str(tmp_path / 'data'), 4)
    torch.jit.script(TinyDetector(8)).save(str(tmp_path / 'detector.pt'))
    good = str(tmp_path / 'good.npz')
    np.savez(good, mu=np.zeros(8), sigma=np.eye(8), features=np.zeros([5, 8], np.float32))
    rng = np.random.default_rng(0)
    cases = dict(random=rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), truncated=file_bytes(good)[:300],
                 empty=b'', not_a_zip=b'\x93NUMPY' + bytes(100))
    corrupt = bytearray(file_bytes(good))
    corrupt[100:400] = bytes(300)                                      # the archive's directory intact, a member's bytes not
    cases['corrupt'] = bytes(corrupt)
    for name, content in cases.items():
        (tmp_path / f'{name}.npz').write_bytes(content)
    np.savez(str(tmp_path / 'pickled.npz'), mu=np.array([{'a': 1}], dtype=object), sigma=np.eye(1))
    np.savez(str(tmp_path / 'no_mu.npz'), sigma=np.eye(8))
    np.savez(str(tmp_path / 'bad_sigma.npz'), mu=np.zeros(8), sigma=np.eye(8)[:, :7])
    np.savez(str(tmp_path / 'bad_features.npz'), mu=np.zeros(8), sigma=np.eye(8), features=np.zeros([5, 9]))
    np.savez(str(tmp_path / 'strings.npz'), mu=np.array(['a'] * 8), sigma=np.eye(8))
    np.savez(str(tmp_path / 'nan.npz'), mu=np.full(8, np.nan), sigma=np.eye(8))
    for name in [*cases, 'pickled', 'no_mu', 'bad_sigma', 'bad_features', 'strings', 'nan']:
        path = str(tmp_path / f'{name}.npz')
        message = one_line_error(['fid', '--images', str(tmp_path / 'data'), '--num-images', '4', '--ref', path, '--detector', str(tmp_path / 'detector.pt')],
                                 re.escape(f'"{path}"'))
        assert 'allow_pickle' not in message and ('evaluate.py ref' in message or 'mu' in message), message
    assert 'never loaded' in one_line_error(['fid', '--images', str(tmp_path / 'data'), '--num-images', '4', '--ref', str(tmp_path / 'pickled.npz'),
                                             '--detector', str(tmp_path / 'detector.pt')], 'pickled')

class OneArgument(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(1)

class WrongShape(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.float()

def test_detector_that_is_not_torchscript_or_has_another_call(tmp_path, monkeypatch):
    write_pngs(str(tmp_path / 'data'), 4)
    torch.save(TinyDetector(8), str(tmp_path / 'pickled.pt'))            # a zip, but a pickle, not TorchScript
    torch.jit.script(OneArgument()).save(str(tmp_path / 'one_argument.pt'))
    torch.jit.script(WrongShape()).save(str(tmp_path / 'wrong_shape.pt'))
    monkeypatch.setattr(evaluate, 'stats_of_images', lambda *args, **kwargs: pytest.fail('computed with a bad detector'))
    for name, match in (('pickled', 'is not a TorchScript archive'), ('one_argument', 'fails on detector\\(uint8 images \\[N, 3, 16, 16\\], return_features=True\\)'),
                        ('wrong_shape', 'returns \\[2, 3, 16, 16\\] torch.float32 for detector')):
        path = str(tmp_path / f'{name}.pt')
        assert path in one_line_error(['ref', '--data', str(tmp_path / 'data'), '--dest', str(tmp_path / 'ref.npz'), '--detector', path], match)
    assert not os.path.exists(tmp_path / 'ref.npz')

def test_damaged_or_foreign_run_files_in_plot(tmp_path, capsys):
    run = tmp_path / 'run'
    os.makedirs(run)
    lines = [json.dumps(dict(iteration=i, loss_fdistill=1.0 / (i + 1))) for i in range(4)]
    (run / 'stats.jsonl').write_text('\n'.join(lines) + '\n{"iteration": 4, "loss_fd')     # torn last line: a run writing it
    evaluate.main(['plot', '--ckpt', str(run)])
    assert os.listdir(run / 'plots') == ['losses.png']
    for bad in ('{"iteration": 1}\nnot json\n{"iteration": 2}\n', '{"iteration": "one", "loss": 1}\n{"iteration": 2}\n',
                '{"iteration": 1, "loss": "high"}\n{"iteration": 2}\n', '[1, 2]\n{"iteration": 2}\n', '\x00\x01\n{"iteration": 2}\n'):
        (run / 'stats.jsonl').write_text(bad)
        one_line_error(['plot', '--ckpt', str(run)], 'stats.jsonl line 1 is not a stats line of training_loop.py|stats.jsonl line 2 is not')
    (run / 'stats.jsonl').write_text('\n'.join(lines) + '\n')
    for bad, match in (('{"f": "js", "num_b', 'training_options.json is not readable JSON'), ('[1]', 'is not the training_options.json'),
                       ('{"num_bins": -3}', 'bad num_bins'), ('{"num_bins": "ten"}', 'bad num_bins'), ('{"r_min": "low"}', 'bad r_min')):
        (run / 'training_options.json').write_text(bad)
        one_line_error(['plot', '--ckpt', str(run)], match)
    os.remove(run / 'training_options.json')
    # fid-snapshots.json is a cache: an unreadable one is named, and the other figures are drawn.
    shutil.rmtree(run / 'plots')
    for bad in ('{"snapshots": [{"iteration": 1', '{"snapshots": [{"iteration": "x", "fid": 1.0}]}', '[]'):
        (run / 'fid-snapshots.json').write_text(bad)
        evaluate.main(['plot', '--ckpt', str(run)])
        assert 'Skipping the FID figure' in capsys.readouterr().out and os.listdir(run / 'plots') == ['losses.png']

#----------------------------------------------------------------------------
# Outputs that cannot be written: one line naming the path, before compute; a full disk leaves no partial file.

def test_unwritable_outputs_are_one_line_before_compute(tmp_path, no_compute):
    write_pngs(str(tmp_path / 'data'), 4)
    torch.jit.script(TinyDetector(8)).save(str(tmp_path / 'detector.pt'))
    ref = ['ref', '--data', str(tmp_path / 'data'), '--detector', str(tmp_path / 'detector.pt')]
    (tmp_path / 'a_file').write_text('x')
    one_line_error([*ref, '--dest', str(tmp_path / 'a_file' / 'ref.npz')], 'a_file" is an existing file, not a folder')
    one_line_error([*ref, '--dest', str(tmp_path)], 'is a folder: pass a file path')
    # /sys refuses new files to every user (root included), which chmod does not; this is what a read-only folder does.
    one_line_error([*ref, '--dest', '/sys/fdistill/ref.npz'], 'cannot write in "/sys"')
    long_name = 'x' * 250 + '.npz'                                     # 254 bytes: its temp file's name would not fit
    one_line_error([*ref, '--dest', str(tmp_path / long_name)], 'too long for the file system')
    one_line_error(['generate', '--teacher', str(tmp_path / 'detector.pt'), '--outdir', str(tmp_path / 'a_file')], 'is an existing file, not a folder')
    os.makedirs(tmp_path / 'run')
    (tmp_path / 'run' / 'stats.jsonl').write_text('{"iteration": 0, "loss_fdistill": 1.0}\n')
    one_line_error(['plot', '--ckpt', str(tmp_path / 'run'), '--outdir', '/sys/fdistill-plots'], 'cannot write in "/sys"')
    assert not os.path.exists(tmp_path / long_name) and sorted(os.listdir(tmp_path)) == ['a_file', 'data', 'detector.pt', 'run']

def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    write_pngs(str(tmp_path / 'data'), 4)
    torch.jit.script(TinyDetector(8)).save(str(tmp_path / 'detector.pt'))
    os.makedirs(tmp_path / 'out')
    savez = np.savez

    def full_disk(f, **arrays):                                        # half the file written, then the disk is full
        savez(f, **arrays)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, 'savez', full_disk)
    message = one_line_error(['ref', '--data', str(tmp_path / 'data'), '--dest', str(tmp_path / 'out' / 'ref.npz'), '--detector', str(tmp_path / 'detector.pt')],
                             'No space left on device')
    assert f'in "{tmp_path / "out"}"' in message and os.listdir(tmp_path / 'out') == []
    # The same for plot's PNGs, and a previous output stays intact.
    monkeypatch.undo()
    os.makedirs(tmp_path / 'run')
    (tmp_path / 'run' / 'stats.jsonl').write_text('{"iteration": 0, "loss_fdistill": 1.0}\n')
    evaluate.main(['plot', '--ckpt', str(tmp_path / 'run')])
    before = file_bytes(tmp_path / 'run' / 'plots' / 'losses.png')
    import matplotlib.figure

    def full_disk_png(self, f, **kwargs):
        f.write(b'\x89PNG partial')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', full_disk_png)
    one_line_error(['plot', '--ckpt', str(tmp_path / 'run')], f'in "{tmp_path / "run" / "plots"}"')
    assert os.listdir(tmp_path / 'run' / 'plots') == ['losses.png'] and file_bytes(tmp_path / 'run' / 'plots' / 'losses.png') == before
