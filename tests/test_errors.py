"""What a careless or hostile user meets: one-line errors, checked flags, verified checkpoints, damaged files."""

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

import dataset
import edm_nets
import edm_pickle
import evaluate
import fixtures
import train_cifar
import flags
import rundir
import train_edm

#----------------------------------------------------------------------------
# One mechanism for every entry point: `prog: error: message`, exit status 2; library errors keep their traceback.

def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    with pytest.raises(SystemExit) as exit:
        with flags.user_errors('train_cifar.py'):
            dataset.ImageDataset('x.zip')
    message = "train_cifar.py: error: Dataset not found: x.zip (pass a zip or folder of PNGs made by EDM's dataset_tool.py)"
    assert exit.value.code == 2 and str(exit.value) == message
    assert capsys.readouterr().err == message + '\n'
    with pytest.raises(json.JSONDecodeError):                     # a ValueError inside a library: a bug, not a user error
        with flags.user_errors('train_cifar.py'):
            json.loads('{')
    assert capsys.readouterr().err == ''

BAD_FLAGS = [(['--keep', '-1'], '--keep: must be a positive integer, got -1'),
             (['--ckpt-every', '0'], '--ckpt-every: must be a positive integer, got 0'),
             (['--max-nan', '0'], '--max-nan: must be a positive integer, got 0'),
             (['--batch-gpu', '0'], '--batch-gpu: must be a positive integer, got 0'),
             (['--batch', '-8'], '--batch: must be a positive integer, got -8'),
             (['--lr', 'inf'], '--lr: must be a finite number >= 0, got inf'),
             (['--lr', 'nan'], '--lr: must be a finite number >= 0, got nan'),
             (['--r-max', 'inf'], '--r-min must lie in (0, 1) and --r-max above 1'),
             (['--disc-res', '8,x'], '--disc-res 8,x: expected resolutions separated by commas'),
             (['--sigma-init', '0'], '--sigma-init: must be a finite number > 0, got 0'),
             (['--ratio-ema', '1'], '--ratio-ema 1.0: the decay must lie in [0, 1)'),
             (['--ratio-ema', '1.5'], '--ratio-ema 1.5: the decay must lie in [0, 1)')]

@pytest.mark.parametrize('args,expect', BAD_FLAGS, ids=[a[0] for a, _ in BAD_FLAGS])
def test_zero_negative_or_non_finite_flags_are_errors(args, expect, capsys):
    with pytest.raises(SystemExit) as exit:
        flags.parse_args('test', train_cifar.PRESET, train_edm.add_edm_args, args)
    assert exit.value.code == 2 and expect in capsys.readouterr().err.strip().splitlines()[-1]

def test_evaluate_counts_of_zero_are_errors(capsys):
    for args, flag in ((['fid', '--num-images', '0', '--ref', 'r.npz', '--detector', 'd.pt'], '--num-images'),
                       (['fid', '--repeats', '0', '--ref', 'r.npz', '--detector', 'd.pt'], '--repeats'),
                       (['generate', '--batch', '0', '--outdir', 'o'], '--batch'),
                       (['latency', '--warmup', '-1'], '--warmup')):
        with pytest.raises(SystemExit) as exit:
            evaluate.main(args)
        assert exit.value.code == 2 and f'{flag}: must be' in capsys.readouterr().err, args

#----------------------------------------------------------------------------
# Checkpoints: checksummed, never non-finite, damage reported in one line.

def test_checkpoint_checksum_truncation_and_non_finite_weights(tmp_path):
    state = dict(iteration=3, options=dict(f='fkl', disc_res=[8, 4]), generator={'w': torch.randn(64, 64), 'b': torch.zeros(64, dtype=torch.bfloat16)},
                 opt_g={'state': {0: {'step': torch.tensor(3.0), 'exp_avg': torch.randn(64)}}, 'param_groups': [{'lr': 1e-4, 'params': [0]}]})
    path = str(tmp_path / 'checkpoint-0000003.pt')
    rundir.save_checkpoint(path, state)
    loaded = rundir.load_checkpoint(path)
    assert loaded.keys() == state.keys() and torch.equal(loaded['generator']['w'], state['generator']['w'])
    raw = bytearray(open(path, 'rb').read())
    offset = raw.find(state['generator']['w'].numpy().tobytes()[:64])     # the weight's bytes, stored uncompressed
    assert offset > 0
    raw[offset + 1000] ^= 0x01                                            # one flipped bit
    open(path, 'wb').write(bytes(raw))
    assert torch.load(path, weights_only=True)['iteration'] == 3         # torch itself does not notice
    with pytest.raises(ValueError, match='fails its checksum: its bytes changed after it was written'):
        rundir.load_checkpoint(path)
    open(path, 'wb').write(bytes(raw[:len(raw) // 2]))
    with pytest.raises(ValueError, match='is truncated or corrupt'):
        rundir.load_checkpoint(path)
    state['generator']['w'][5, 7] = float('nan')
    with pytest.raises(FloatingPointError, match='generator/w is not finite'):
        rundir.save_checkpoint(str(tmp_path / 'nan.pt'), state)
    assert not list(tmp_path.glob('nan.pt*'))
    torch.save(state, tmp_path / 'nan.pt')                                # written by other means
    with pytest.raises(ValueError, match='generator/w is not finite'):
        rundir.load_checkpoint(str(tmp_path / 'nan.pt'))

def test_evaluate_reports_a_damaged_checkpoint_in_one_line(tmp_path, capsys):
    (tmp_path / 'checkpoint-0000001.pt').write_bytes(b'PK\x03\x04 not really a checkpoint')
    with pytest.raises(SystemExit) as exit:
        evaluate.main(['generate', '--ckpt', str(tmp_path), '--outdir', str(tmp_path / 'out')])
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith(f'evaluate.py generate: error: Checkpoint {tmp_path / "checkpoint-0000001.pt"} is truncated or corrupt')
    assert not (tmp_path / 'out').exists()

#----------------------------------------------------------------------------
# The safe EDM pickle loader builds plain values, tensors and the allowed classes only.

class Reduce:
    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce

def test_crafted_numpy_dtype_is_refused_not_built(tmp_path):
    # np.dtype's pickled state would set fields at offsets past the item size (a SIGSEGV in numpy); the loader
    # checks the name and the state and never hands them to numpy.
    for name, state in (('f8', (3, '|', None, ('a',), {'a': (np.dtype('f8'), 4096)}, 8, 1, 16)), ('V8', (3, '|', None, None, None, 8, 1, 0))):
        path = tmp_path / 'crafted.pkl'
        path.write_bytes(pickle.dumps(dict(ema=Reduce(np.dtype, (name, False, True), state))))
        with pytest.raises(ValueError, match='Refusing numpy dtype'):
            edm_pickle.load_edm_pickle(str(path))

def test_tensor_claiming_more_bytes_than_the_file_is_one_line(tmp_path):
    buf = io.BytesIO()
    torch.save(torch.zeros(4), buf, _use_new_zipfile_serialization=False)
    data = bytearray(buf.getvalue())
    assert data[-24:-16] == (4).to_bytes(8, 'little')                       # legacy format: numel, then the bytes
    data[-24:-16] = (10 ** 12).to_bytes(8, 'little')                      # claims 4 TB
    path = tmp_path / 'huge.pkl'
    path.write_bytes(pickle.dumps(dict(ema=Reduce(torch.storage._load_from_bytes, (bytes(data),)))))
    with pytest.raises(ValueError, match='huge.pkl'):
        edm_pickle.load_edm_pickle(str(path))

def test_teacher_with_a_nan_weight_is_refused(tmp_path):
    net = fixtures.tiny_songunet().eval()
    with torch.no_grad():
        net.model.enc['8x8_conv'].weight[0, 0, 0, 0] = float('nan')
    fixtures.write_edm_pickle(tmp_path / 'nan.pkl', dict(ema=net))
    with pytest.raises(ValueError, match=r'weight model.enc.8x8_conv.weight of the "ema" network is not finite'):
        edm_pickle.load_edm_pickle(str(tmp_path / 'nan.pkl'))

#----------------------------------------------------------------------------
# Datasets: a damaged image or dataset.json is named.

def test_damaged_image_and_labels_are_named(tmp_path):
    with zipfile.ZipFile(fixtures.write_dataset_zip(tmp_path / 'data.zip', num=4, resolution=8)) as z:
        members = {name: z.read(name) for name in z.namelist()}

    def damaged(name, data):
        with zipfile.ZipFile(tmp_path / 'damaged.zip', 'w') as z:
            for member, original in members.items():
                z.writestr(member, data if member == name else original)
        return str(tmp_path / 'damaged.zip')
    images = dataset.ImageDataset(damaged('00000/img00000002.png', members['00000/img00000002.png'][:40]))     # truncated PNG
    with pytest.raises(ValueError, match='cannot read 00000/img00000002.png .*replace or remove that image'):
        images.images([1, 2])
    assert images.first_damaged([0, 1, 3]) is None
    assert 'cannot read 00000/img00000002.png' in images.first_damaged(range(4))
    with pytest.raises(ValueError, match='cannot read 00000/img00000002.png'):       # before training, in one process
        train_edm.verify_images(images, rank=0, world=1)
    with pytest.raises(ValueError, match=r'dataset.json is not \{"labels"'):
        dataset.ImageDataset(damaged('dataset.json', b'{"labels": [["a", 1, 2]]}'))
