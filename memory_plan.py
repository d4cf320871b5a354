"""Planning a training step's GPU memory and FLOPs without a GPU.

The networks are built on fake tensors (torch's FakeTensorMode: shapes, dtypes and storages, no data, no
compute), one step runs on them, and PyTorch's own tracker (torch.distributed._tools.MemTracker) follows
every storage from creation to release, by kind: parameters, buffers, gradients, optimiser states,
activations (made in forward), temporaries (made in backward). torch.utils.flop_counter counts the FLOPs.

    with memory_plan.fake_tensors():
        net = build_network()                                 # real architecture, fake weights
        opt = torch.optim.AdamW(net.parameters())
        plan = memory_plan.plan_step(lambda: train_step(net, opt), [net], [opt])

Fake tensors live on the CPU here, so CUDA's autocast is reproduced as CPU autocast (bf16 for convolutions,
matmuls, attention) plus CUDA's fp32 list (normalisations, softmax, ...: `cuda_autocast_policy`). The fused
attention kernels are the CPU's flash kernel, which saves what CUDA's flash and memory-efficient kernels
save (the output and the log-sum-exp), not the attention map.

What the plan leaves out: the CUDA context and the kernels' code (~0.5-1 GiB a process), cuBLAS and cuDNN
workspaces, NCCL's buffers, the caching allocator's 512-byte rounding and its fragmentation (cached free
blocks that do not fit the next request), and anything the step function itself does not run.
"""

import contextlib
import functools
import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.distributed._tools.mod_tracker
import torch.utils.module_tracker
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode

CATEGORIES = ('parameters', 'buffers', 'gradients', 'optimiser', 'activations', 'temporaries', 'other')
TRACKER_NAMES = dict(Parameter='parameters', Buffer='buffers', Gradient='gradients', Optstate='optimiser', Activation='activations', Temp='temporaries', Other='other')

#----------------------------------------------------------------------------
# Fake tensors and CUDA's autocast policy on the CPU.

# A number read off a fake tensor (loss.item(), bool(torch.isfinite(loss))) has no value to read: it reads as 1,
# so a planned step sees finite losses and takes its optimiser step. copy.deepcopy of a network (the EMA) copies
# each fake tensor's attributes, its mode among them: the copies must stay in this one mode.
class FakeTensors(FakeTensorMode):
    def __deepcopy__(self, memo):
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return 1.0 if dtype.is_floating_point else True if dtype == torch.bool else 1
        return super().__torch_dispatch__(func, types, args, kwargs)

def fake_tensors():                             # Real constants (a noise schedule) may meet fake tensors.
    return FakeTensors(allow_non_fake_inputs=True)

# CUDA's autocast runs these in fp32 (aten/src/ATen/autocast_mode.cpp, its fp32 list); CPU's autocast leaves
# them in bf16, which would halve the normalisations' outputs that the next layer saves.
CUDA_FP32_OPS = [(F, 'group_norm'), (F, 'layer_norm'), (F, 'softmax'), (F, 'log_softmax'), (F, 'softplus'), (F, 'mse_loss'),
    (torch, 'softmax'), (torch, 'log_softmax'), (torch, 'exp'), (torch, 'pow'),
    (torch.Tensor, 'softmax'), (torch.Tensor, 'log_softmax'), (torch.Tensor, 'exp'), (torch.Tensor, 'pow')]

def fp32_under_autocast(op):
    @functools.wraps(op)
    def run(*args, **kwargs):
        if not torch.is_autocast_enabled('cpu'):
            return op(*args, **kwargs)
        args, kwargs = tree_map_only(torch.Tensor, lambda t: t.float() if t.is_floating_point() else t, (args, kwargs))
        with torch.autocast('cpu', enabled=False):
            return op(*args, **kwargs)
    return run

# Around a whole planned step; acts only where the step has turned CPU autocast on, as the loop turns on CUDA's
# (the weights' bf16 copies that autocast caches live as long as its context, so the step must enter and leave
# it where the real step does). The ops are swapped in their modules, not caught by a TorchFunctionMode: the
# backward pass, where checkpointed blocks recompute, runs without the caller's modes.
@contextlib.contextmanager
def cuda_autocast_policy():
    originals = [(owner, name, getattr(owner, name)) for owner, name in CUDA_FP32_OPS]
    try:
        for owner, name, op in originals:
            setattr(owner, name, fp32_under_autocast(op))
        yield
    finally:
        for owner, name, op in originals:
            setattr(owner, name, op)

# Both module trackers (MemTracker's and FlopCounterMode's) hook the gradients reaching each module's inputs, which
# torch.autograd.grad refuses for a leaf input (exact R1's noised reals): leaf inputs go unhooked, which only
# blurs when the tracker thinks that module's backward ends.
@contextlib.contextmanager
def leaf_inputs_unhooked():
    trackers = [torch.distributed._tools.mod_tracker, torch.utils.module_tracker]
    register = torch.autograd.graph.register_multi_grad_hook
    def hook_non_leaves(tensors, fn, **kwargs):
        tensors = [t for t in tensors if not t.is_leaf]
        return register(tensors, fn, **kwargs) if tensors else NoHook()
    try:
        for module in trackers:
            module.register_multi_grad_hook = hook_non_leaves
        yield
    finally:
        for module in trackers:
            module.register_multi_grad_hook = register

#----------------------------------------------------------------------------
# One step's peak memory by category, and its FLOPs.

# MemTracker also keeps every module's own peak, a loop over all modules after every operation: minutes for
# SD's UNet. The plan needs the whole step's peak only, which this keeps as MemTracker does.
# It also hooks the gradient of every parameter of every module it sees run, which frozen parameters (the
# teacher's, the head's in a generator step) refuse: those get no hook, as they get no gradient.
class NoHook:
    def remove(self):
        pass

class StepTracker(MemTracker):
    # Per-module statistics go (a network called twice in a step, as the teacher is, would be refused); kept are
    # the parameters' first sight and the recomputation region of checkpointed blocks (_in_ac).
    def _pre_fw_hook(self, module, inputs):
        if module not in self.memory_tracking:
            self.memory_tracking[module] = None
            self._track_module_params_and_buffers(module, install_grad_hooks=True)
        elif self._mod_tracker.is_bw and self._ac_mod is None:
            self._ac_mod, self._in_ac = weakref.ref(module), True

    def _post_fw_hook(self, module, inputs, outputs):
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod, self._in_ac = None, False

    def _pre_bw_hook(self, module, args):
        pass

    def _post_bw_hook(self, module, args):
        pass

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        for p in module.parameters():
            if not p.requires_grad:
                self._param_to_grad_hook_handles.setdefault(p, (NoHook(), NoHook()))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _update_peak_stats(self, peak_state):
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot['Total']:
                self._peak_mem[device] = snapshot['Total']
                self._peak_mem_snap[device] = dict(snapshot)

class StepPlan(NamedTuple):
    peak:   dict        # Bytes by category (CATEGORIES) at the moment the step's total peaks.
    total:  int         # Bytes at that moment: sum(peak.values()).
    flops:  int         # FLOPs of the step (a multiply-add counts 2), as torch.utils.flop_counter counts them.

# `step()` runs one training step (forward, backward, optimiser step) on `modules` with `optimizers`, all built
# inside fake_tensors(); call this inside that same mode. The step runs twice: once so that the optimisers
# create their states, then measured, as every step after the first is. Where the step enters
# torch.autocast('cpu', dtype=torch.bfloat16), it gets CUDA's bf16 autocast. The FLOPs are counted in the first
# run, the memory in the second: FlopCounterMode's module tracker hooks the tensors that checkpointed blocks
# recompute in the backward pass and keeps them alive until the mode exits (4.9 GiB of SD's UNet at batch 4).
def plan_step(step, modules, optimizers):
    with cuda_autocast_policy(), leaf_inputs_unhooked():
        with FlopCounterMode(display=False) as flops:
            step()
        tracker = StepTracker()
        tracker.track_external(*modules, *optimizers)
        with tracker:
            step()
    snapshot = tracker.get_tracker_snapshot('peak')
    peak = dict.fromkeys(CATEGORIES, 0)
    for device_snapshot in snapshot.values():
        for kind, size in device_snapshot.items():
            if kind != 'Total':
                peak[TRACKER_NAMES[kind.value]] += size
    return StepPlan(peak, sum(peak.values()), flops.get_total_flops())

#----------------------------------------------------------------------------
# What the tracker cannot see, and the largest batch that fits.

# DDP all-reduces gradients through buckets: without gradient_as_bucket_view it keeps a second copy of every
# gradient there; with it, the .grad tensors are views of the buckets and cost nothing extra.
def ddp_bucket_bytes(modules, world, gradient_as_bucket_view=False):
    if world <= 1 or gradient_as_bucket_view:
        return 0
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if p.requires_grad)

# AdamW keeps exp_avg and exp_avg_sq, each the parameter's size and dtype (fp32 here), plus a step count.
def adamw_state_bytes(modules):
    return sum(2 * p.numel() * p.element_size() for m in modules for p in m.parameters() if p.requires_grad)

GiB = 2 ** 30

#----------------------------------------------------------------------------
