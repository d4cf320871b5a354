"""memory_plan: the tracker's count on networks small enough to count by hand, FLOPs against closed forms."""

import torch
import torch.nn.functional as F

import memory_plan

# Linear(D0, D1) -> ReLU -> Linear(D1, D2), loss = mean(y^2), AdamW (single-tensor: no foreach temporaries).
# With a large batch and a wide hidden layer the step peaks in the backward pass at ReLU's backward, when alive are:
# the parameters, AdamW's exp_avg and exp_avg_sq (each the parameters' size) and one 4-byte fp32 step count per
# parameter tensor, the second layer's gradients, the input x and ReLU's output r1 (saved by ReLU and layer 2),
# the loss and backward's seed ones_like(loss), and two [B, D1] temporaries: the gradient reaching r1 and the
# gradient ReLU's backward makes from it.
D0, D1, D2 = 4, 64, 4

def linear_step(batch, bf16):
    net = torch.nn.Sequential(torch.nn.Linear(D0, D1), torch.nn.ReLU(), torch.nn.Linear(D1, D2))
    opt = torch.optim.AdamW(net.parameters(), foreach=False)
    def step():
        x = torch.randn(batch, D0)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            loss = net(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return memory_plan.plan_step(step, [net], [opt]), net

def test_tracker_counts_a_linear_stack_by_hand():
    B = 4096
    num_params = D0 * D1 + D1 + D1 * D2 + D2
    for bf16 in [False, True]:
        with memory_plan.fake_tensors():
            plan, net = linear_step(B, bf16)
        act = 2 if bf16 else 4      # bytes of an activation: autocast runs the Linears (and what follows) in bf16
        assert plan.peak['parameters'] == 4 * num_params
        assert plan.peak['optimiser'] == memory_plan.adamw_state_bytes([net]) + 4 * 4 == 8 * num_params + 16
        assert plan.peak['gradients'] == 4 * (D1 * D2 + D2)
        x_saved = B * D0 * 4 + (B * D0 * act if bf16 else 0)         # x, and under autocast its bf16 copy that layer 1 saves
        assert plan.peak['activations'] == x_saved + B * D1 * act + 2 * act
        assert plan.peak['temporaries'] == 2 * B * D1 * act
        assert plan.total == sum(plan.peak.values())
        # Forward 2 B D0 D1 + 2 B D1 D2; backward: layer 2's weight and input gradients, layer 1's weight gradient only.
        assert plan.flops == 2 * B * (D0 * D1 + D1 * D2) + 2 * B * (2 * D1 * D2 + D0 * D1)

def test_conv_flops_are_the_closed_form():
    B, C_in, C_out, H, k = 2, 3, 8, 16, 3
    with memory_plan.fake_tensors():
        conv = torch.nn.Conv2d(C_in, C_out, k, padding=1)
        opt = torch.optim.SGD(conv.parameters())
        def step():
            conv(torch.randn(B, C_in, H, H)).square().mean().backward()
            opt.step()
        plan = memory_plan.plan_step(step, [conv], [opt])
    macs = B * C_out * H * H * C_in * k * k        # one multiply-add per output pixel, input channel and tap
    assert plan.flops == 2 * macs + 2 * macs        # forward, and the weight gradient (the input needs none)

# CPU autocast leaves normalisations and softmax in bf16; CUDA's, which the plan reproduces, runs them in fp32.
def test_cuda_autocast_policy():
    x = torch.randn(2, 8, 4, 4)
    with memory_plan.cuda_autocast_policy(), torch.autocast('cpu', dtype=torch.bfloat16):
        h = F.conv2d(x, torch.randn(8, 8, 1, 1))
        assert h.dtype == torch.bfloat16
        assert F.group_norm(h, 2).dtype == torch.float32 and torch.softmax(h, -1).dtype == torch.float32
        assert F.layer_norm(h, (4,)).dtype == torch.float32 and F.silu(h).dtype == torch.bfloat16
    with memory_plan.cuda_autocast_policy():
        assert F.group_norm(x.bfloat16(), 2).dtype == torch.bfloat16    # autocast off: nothing is cast

def test_ddp_bucket_bytes():
    net = torch.nn.Linear(10, 5)
    assert memory_plan.ddp_bucket_bytes([net], world=8) == 4 * 55
    assert memory_plan.ddp_bucket_bytes([net], world=8, gradient_as_bucket_view=True) == 0
    assert memory_plan.ddp_bucket_bytes([net], world=1) == 0

# SD's gradient checkpointing, planned: the same step on fake tensors and on real CPU tensors (MemTracker following
# real storages) peaks at the same bytes, category by category (the fake tensors have the real ones' shapes, dtypes
# and lifetimes: exact); and checkpointing cuts the activations alive at the peak. Before the FLOPs moved to the
# warm-up run, FlopCounterMode kept every recomputed block alive until the step's end and checkpointing "saved nothing".
def sd_step(grad_ckpt, batch=4):
    from test_sd_unet import TINY
    import sd_unet
    torch.manual_seed(0)
    unet = sd_unet.SDUNet(**dict(TINY, sample_size=16))
    unet.gradient_checkpointing = grad_ckpt
    opt = torch.optim.AdamW(unet.parameters(), foreach=False)
    def step():
        x, ctx = torch.randn(batch, 4, 16, 16), torch.randn(batch, 77, TINY['cross_attention_dim'])
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = unet(x, torch.full([batch], 500), ctx).float().square().mean()
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)
    return memory_plan.plan_step(step, [unet], [opt])

def test_sd_checkpointing_planned_as_on_real_tensors():
    with memory_plan.fake_tensors():
        fake = sd_step(grad_ckpt=True)
        plain = sd_step(grad_ckpt=False)
    real = sd_step(grad_ckpt=True)
    assert fake.peak == real.peak and fake.flops == real.flops
    assert fake.peak['activations'] < plain.peak['activations'] / 3    # the blocks' insides are not kept (6.8x fewer bytes here)
    assert fake.flops > plain.flops                                     # the recomputed forward passes are counted
