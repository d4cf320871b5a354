"""train_cifar.py with probes, for tests/test_train.py::test_ddp_gradients_are_bucket_views_and_rank0_alone_builds_the_grid.

torchrun --nproc_per_node=2 tests/train_probe.py TRAIN_CIFAR_FLAGS
Runs train_cifar.py unchanged and writes <outdir>/probe-rank<R>.json: how setup() built the DDP modules, the
gradients each optimiser step found (how many, in how many storages, views or not), and the batch of every call
of the grid's network while grid() ran.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_cifar
import train_edm
import training_loop

probe = dict(ddp={}, steps=[], grid_calls=[])

def setup(*args, **kwargs):
    s = setup.original(*args, **kwargs)
    for name in ('ddp_generator', 'ddp_fake_score', 'ddp_head'):
        net = getattr(s, name)
        probe['ddp'][name] = dict(gradient_as_bucket_view=getattr(net, 'gradient_as_bucket_view', None),
                                  find_unused_parameters=getattr(net, 'find_unused_parameters', None))
    return s

def optimizer_step(s, opt, finite, stats, **nets):
    for name, net in nets.items():
        trainable = [p for p in net.parameters() if p.requires_grad]
        grads = [p.grad for p in trainable if p.grad is not None]
        probe['steps'].append(dict(net=name, trainable=len(trainable), grads=len(grads),
            storages=len({g.untyped_storage().data_ptr() for g in grads}), views=sum(g._base is not None for g in grads)))
    return optimizer_step.original(s, opt, finite, stats, **nets)

def grid(s, run, it):
    nets = [net for net in (s.ema, s.generator) if net is not None]
    hooks = [net.register_forward_hook(lambda module, args, out: probe['grid_calls'].append([it, len(args[0])])) for net in nets]
    try:
        return grid.original(s, run, it)
    finally:
        for hook in hooks:
            hook.remove()

for f in (setup, optimizer_step, grid):
    f.original = getattr(training_loop, f.__name__)
    setattr(training_loop, f.__name__, f)

if __name__ == '__main__':
    train_edm.main(train_cifar.__doc__, train_cifar.PRESET)
    outdir = sys.argv[sys.argv.index('--outdir') + 1]
    with open(os.path.join(outdir, f'probe-rank{os.environ.get("RANK", 0)}.json'), 'w') as f:
        json.dump(probe, f)
