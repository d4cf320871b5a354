"""Reading NVIDIA's EDM pickles (edm-cifar10-32x32-cond-vp.pkl, edm-imagenet-64x64-cond-adm.pkl) without running their code.

load_edm_pickle() returns the pickle's dict with each network rebuilt as our own edm_nets.EDMPrecond.
"""

import collections
import io
import os
import pickle

import numpy as np
import torch

from edm_nets import EDMPrecond

#----------------------------------------------------------------------------
# Reading NVIDIA's EDM pickles without running their code.
# Each network in those files is a reduce call to torch_utils.persistence._reconstruct_persistent_obj(meta),
# meta = {type, version, module_src, class_name, state}; EDM would exec(module_src). We record
# class_name and state instead, refuse every global outside a short list, and rebuild our own
# EDMPrecond from state['_init_kwargs'].

class PickledObject:
    """Inert record of a pickled module: its class name and __dict__ state. Runs nothing."""
    class_name = 'ModuleDict' # torch.nn.ModuleDict is pickled by class; EDM's own classes set this
    state = None

    def __setstate__(self, state):
        self.state = state

def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != 6:
        raise pickle.UnpicklingError('Unsupported torch_utils.persistence record (expected type "class", version 6)')
    record = PickledObject()
    record.class_name = meta['class_name']
    record.state = meta['state']
    return record

# torch pickles each storage as torch.save bytes; the stock loader reads them with weights_only=False.
def _load_storage_from_bytes(b):
    try:
        return torch.load(io.BytesIO(b), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split('WeightsUnpickler error:')[-1].strip().splitlines()[0]
        raise pickle.UnpicklingError(f'Refusing a tensor storage that is not plain tensor data ({detail})') from None

# numpy scalars (e.g. the float64 sigma_data in EDM's kwargs) are pickled as scalar(dtype, bytes), the dtype as
# dtype(name, align, copy) plus a __setstate__ tuple. numpy would trust that state (a crafted field offset past
# the item size crashes the interpreter), so the pickle gets an inert record instead, and scalar() builds a
# plain Python number from it, for plain numeric dtypes only.
class PickledDtype:
    def __init__(self, name, align=False, copy=True):
        if not isinstance(name, str) or name.lstrip('<>|=') not in _PLAIN_DTYPES:
            raise pickle.UnpicklingError(f'Refusing numpy dtype {name!r}: only plain numeric scalars are allowed')
        self.name, self.byteorder = name, '='

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ('<', '>', '|', '=') and state[2:5] == (None, None, None)):
            raise pickle.UnpicklingError('Refusing numpy dtype state with subarrays or fields: only plain numeric scalars are allowed')
        self.byteorder = state[1]

_PLAIN_DTYPES = {f'{kind}{size}' for kind, sizes in (('f', (2, 4, 8)), ('i', (1, 2, 4, 8)), ('u', (1, 2, 4, 8)), ('b', (1,))) for size in sizes}

def _numpy_scalar(dtype, data):
    if not isinstance(dtype, PickledDtype) or not isinstance(data, bytes):
        raise pickle.UnpicklingError('Refusing a numpy scalar that is not a plain number')
    dt = np.dtype(dtype.name.lstrip('<>|=')).newbyteorder(dtype.byteorder if dtype.byteorder in '<>' else '=')
    if len(data) != dt.itemsize:
        raise pickle.UnpicklingError(f'Refusing a numpy {dt} scalar of {len(data)} bytes')
    return np.frombuffer(data, dtype=dt)[0].item()

_SAFE_GLOBALS = {
    ('collections', 'OrderedDict'):                          collections.OrderedDict,
    ('builtins', 'set'):                                     set, # sets in pickle protocols < 4
    ('torch._utils', '_rebuild_tensor_v2'):                  torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'):                  torch._utils._rebuild_parameter,
    ('torch.storage', '_load_from_bytes'):                   _load_storage_from_bytes,
    ('torch.nn.modules.container', 'ModuleDict'):            PickledObject,
    ('numpy', 'dtype'):                                      PickledDtype,
    ('numpy.core.multiarray', 'scalar'):                     _numpy_scalar, # numpy 1 name
    ('numpy._core.multiarray', 'scalar'):                    _numpy_scalar, # numpy 2 name
    ('dnnlib.util', 'EasyDict'):                             dict,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
}

class EDMUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f'Refusing to load global {module}.{name}: not part of an EDM network pickle')
        return _SAFE_GLOBALS[(module, name)]

def _collect_tensors(record, prefix=''):
    if not isinstance(record, PickledObject):
        raise ValueError(f'Unexpected submodule {prefix or "<root>"} of type {type(record).__name__} in EDM pickle')
    state = record.state
    tensors = {}
    for name, value in state['_parameters'].items():
        if value is not None:
            tensors[prefix + name] = value
    for name, value in state['_buffers'].items():
        if value is not None and name not in state.get('_non_persistent_buffers_set', ()):
            tensors[prefix + name] = value
    for name, child in state['_modules'].items():
        if child is not None:
            tensors.update(_collect_tensors(child, prefix + name + '.'))
    return tensors

def _rebuild_network(record, path):
    if record.class_name != 'EDMPrecond':
        raise ValueError(f'{path}: network class "{record.class_name}" is not supported; use an EDMPrecond pickle (e.g. edm-cifar10-32x32-cond-vp.pkl)')
    init_kwargs = record.state.get('_init_kwargs')
    if not isinstance(init_kwargs, dict):
        raise ValueError(f'{path}: the "ema" network lacks _init_kwargs; it was not written by EDM\'s training loop')
    with torch.device('meta'):
        net = EDMPrecond(*(record.state.get('_init_args') or ()), **init_kwargs)
    tensors = {name: torch.as_tensor(value).detach() for name, value in _collect_tensors(record).items()}
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f'{path}: weight {bad[0]} of the "ema" network is not finite (NaN or infinity); use an intact teacher pickle')
    try:
        net.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f'{path}: the "ema" weights do not fit its _init_kwargs ({str(err).splitlines()[-1].strip()[:200]})') from None
    return net.eval().requires_grad_(False)

def load_edm_pickle(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'EDM network pickle not found: {path} (download e.g. edm-cifar10-32x32-cond-vp.pkl from NVIDIA and pass its local path)')
    try:
        with open(path, 'rb') as f:
            data = EDMUnpickler(f).load()
    except Exception as err:                    # refused, truncated, corrupt, or claiming tensors larger than the file
        if isinstance(err, pickle.UnpicklingError) and str(err).startswith(('Refusing', 'Unsupported')):
            raise ValueError(f'{path}: {err}') from None
        detail = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
        raise ValueError(f'{path} is not a readable EDM network pickle: truncated or corrupt ({type(err).__name__}: {detail})') from None
    if not isinstance(data, dict) or not isinstance(data.get('ema'), PickledObject):
        raise ValueError(f'{path} is not an EDM network pickle: expected a dict with an "ema" network')
    data['ema'] = _rebuild_network(data['ema'], path)
    return data

#----------------------------------------------------------------------------
