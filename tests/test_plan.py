"""--plan at Table 5's presets: a CI guard that each fits 8 x 80 GB GPUs with at least 10 % to spare."""

import flags
import plan
import train_cifar
import train_edm
import train_imagenet
import train_t2i
import training_loop

GiB = 2 ** 30

# Each preset's global batch on 8 GPUs (the default --gpus), every step kind and the sample grid. The bounds are
# 80 GB (74.5 GiB) less 10 % and rounded down (issue 20): room for what the plan leaves out (CUDA context,
# workspaces, fragmentation) and for its own error.
def check_fits(result, bound_gib, capsys):
    worst = max(k['total'] for k in result['kinds'].values())
    assert result['gpus'] == 8 and result['rounds'] == 1
    assert worst <= bound_gib * GiB, capsys.readouterr().out
    assert all(k['largest_batch_gpu'] >= result['batch_gpu'] for n, k in result['kinds'].items() if n != 'grid')

def test_imagenet64_bf16_fits(capsys):
    result = train_edm.main(train_imagenet.__doc__, train_imagenet.PRESET, ['--plan'])
    assert result['precision'] == 'bf16' and result['batch_gpu'] == 64
    check_fits(result, 55, capsys)

def test_cifar10_fits(capsys):
    result = train_edm.main(train_cifar.__doc__, train_cifar.PRESET, ['--plan'])
    assert result['batch_gpu'] == 256
    check_fits(result, 70, capsys)

def test_sd15_fits_with_gradient_checkpointing(capsys):
    opts = flags.parse_args(train_t2i.__doc__, train_t2i.PRESET, train_t2i.add_t2i_args, ['--plan'])
    result = plan.main(opts, train_t2i.build_task)
    assert opts.grad_ckpt and result['precision'] == 'bf16' and result['batch_gpu'] == 128
    check_fits(result, 70, capsys)
