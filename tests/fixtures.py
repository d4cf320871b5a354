"""Test fixtures: tiny EDM teachers written in NVIDIA's official pickle format, and EDM-style datasets."""

import io
import json
import pickle
import sys
import types
import zipfile

import numpy as np
import PIL.Image

import edm_nets

# The source EDM would exec() when loading; ours must never run it.
HOSTILE_SRC = "raise RuntimeError('module_src was executed')\n"

#----------------------------------------------------------------------------
# EDM pickles every network class of training/networks.py through torch_utils.persistence: the
# object reduces to _reconstruct_persistent_obj(meta), meta = {type, version, module_src, class_name,
# state}, with state the object's __dict__ (nested networks reduce the same way).

def _reconstruct_persistent_obj(meta):
    raise RuntimeError('only used as a name while pickling')

def write_edm_pickle(path, net, module_src=HOSTILE_SRC, extra=None):
    fake = types.ModuleType('torch_utils.persistence')
    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    saved = {name: sys.modules.get(name) for name in ('torch_utils', 'torch_utils.persistence')}
    sys.modules['torch_utils'] = types.ModuleType('torch_utils')
    sys.modules['torch_utils.persistence'] = fake

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if type(obj).__module__ != 'edm_nets':
                return NotImplemented
            state = dict(obj.__dict__)
            if isinstance(obj, edm_nets.EDMPrecond):
                state['_init_kwargs'] = dict(obj.init_kwargs)
                state['_init_args'] = ()
            meta = dict(type='class', version=6, module_src=module_src,
                        class_name=type(obj).__name__, state=state)
            return _reconstruct_persistent_obj, (meta,)
    try:
        with open(path, 'wb') as f:
            Pickler(f, protocol=pickle.HIGHEST_PROTOCOL).dump(dict(ema=net, **(extra or {})))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module

def tiny_songunet(label_dim=4, resolution=8, **kwargs):
    return edm_nets.EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=label_dim, model_type='SongUNet',
        model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[resolution // 2], augment_dim=9, dropout=0.1, **kwargs)

#----------------------------------------------------------------------------
# A dataset zip as EDM's dataset_tool.py writes it: 00000/img00000000.png ... and dataset.json.

def write_dataset_zip(path, num=32, resolution=16, channels=3, num_classes=4, seed=0):
    rnd = np.random.RandomState(seed)
    labels = []
    with zipfile.ZipFile(path, 'w') as z:
        for i in range(num):
            name = f'{i // 1000:05d}/img{i:08d}.png'
            image = rnd.randint(0, 256, (resolution, resolution, channels), dtype=np.uint8)
            buf = io.BytesIO()
            PIL.Image.fromarray(image[:, :, 0] if channels == 1 else image).save(buf, format='PNG')
            z.writestr(name, buf.getvalue())
            labels.append([name, int(i % num_classes)])
        z.writestr('dataset.json', json.dumps(dict(labels=labels if num_classes else None)))
    return path
