"""Test fixtures: tiny EDM teachers written in NVIDIA's official pickle format, and EDM-style datasets."""

import io
import json
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import edm_nets
from distributed import free_port

# The source EDM would exec() when loading; ours must never run it.
HOSTILE_SRC = "raise RuntimeError('module_src was executed')\n"

#----------------------------------------------------------------------------
# Official EDM pickle format, written here without EDM's code: each network is a reduce call to
# torch_utils.persistence._reconstruct_persistent_obj(meta), meta = {type, version, module_src,
# class_name, state}; tensors go through torch's own pickling (torch._utils._rebuild_*,
# torch.storage._load_from_bytes); numpy scalars under the numpy 1 name numpy.core.multiarray.scalar;
# dataset_kwargs as dnnlib.util.EasyDict.

def fake_global(monkeypatch, qualname, obj):
    module_name, name = qualname.rsplit('.', 1)
    parts = module_name.split('.')
    for i in range(1, len(parts)):
        if '.'.join(parts[:i]) not in sys.modules:
            monkeypatch.setitem(sys.modules, '.'.join(parts[:i]), types.ModuleType('.'.join(parts[:i])))
    module = types.ModuleType(module_name)
    setattr(module, name, obj)
    obj.__module__, obj.__qualname__, obj.__name__ = module_name, name, name
    monkeypatch.setitem(sys.modules, module_name, module)

def never_called(*args):
    raise AssertionError('the pickle writer stub must not be called')

class EDMLoss: # stands in for training.loss.EDMLoss, another persistent class in the snapshot
    def __init__(self):
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5

def write_edm_pickle(path, data, module_src=HOSTILE_SRC):
    with pytest.MonkeyPatch.context() as m:
        reconstruct = types.FunctionType(never_called.__code__, {})
        scalar = types.FunctionType(never_called.__code__, {})
        EasyDict = type('EasyDict', (dict,), {})
        fake_global(m, 'torch_utils.persistence._reconstruct_persistent_obj', reconstruct)
        fake_global(m, 'numpy.core.multiarray.scalar', scalar)
        fake_global(m, 'dnnlib.util.EasyDict', EasyDict)

        class Pickler(pickle.Pickler):
            def reducer_override(self, obj):
                if isinstance(obj, np.float64):
                    return scalar, (obj.dtype, obj.tobytes())
                if isinstance(obj, (torch.nn.Module, EDMLoss)) and not isinstance(obj, torch.nn.ModuleDict):
                    state = dict(obj.__dict__)
                    state['_init_args'] = ()
                    state['_init_kwargs'] = state.pop('init_kwargs', {})
                    meta = dict(type='class', version=6, module_src=module_src, class_name=type(obj).__name__, state=state)
                    return reconstruct, (meta,)
                return NotImplemented

        data = dict(data, dataset_kwargs=EasyDict(path='cifar10-32x32.zip', use_labels=True))
        with open(path, 'wb') as f:
            Pickler(f, protocol=4).dump(data)

def tiny_songunet(label_dim=4, resolution=8, **kwargs):
    return edm_nets.EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=label_dim, model_type='SongUNet',
        model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[resolution // 2], augment_dim=9, dropout=0.1, **kwargs)

#----------------------------------------------------------------------------
# A dataset zip as EDM's dataset_tool.py writes it: 00000/img00000000.png ... and dataset.json.

def write_dataset_zip(path, num=32, resolution=16, channels=3, num_classes=4, seed=0):
    rnd = np.random.RandomState(seed)
    images = [rnd.randint(0, 256, (resolution, resolution, channels), dtype=np.uint8) for _ in range(num)]
    return write_zip(path, images, [i % num_classes for i in range(num)])

def write_zip(path, images, labels=None):       # uint8 HWC images; labels: class indices, or None
    names = [f'{i // 1000:05d}/img{i:08d}.png' for i in range(len(images))]
    with zipfile.ZipFile(path, 'w') as z:
        for name, image in zip(names, images):
            buf = io.BytesIO()
            PIL.Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image).save(buf, format='PNG')
            z.writestr(name, buf.getvalue())
        z.writestr('dataset.json', json.dumps(dict(labels=None if labels is None else [[n, int(l)] for n, l in zip(names, labels)])))
    return path

#----------------------------------------------------------------------------
# Run helpers for the torchrun tests.

def load_checkpoint(outdir, it):
    return torch.load(os.path.join(outdir, f'checkpoint-{it:07d}.pt'), map_location='cpu', weights_only=True)
