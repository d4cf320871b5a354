"""gpu_acceptance.py: its flags and JSON layout on any machine; the run itself only where a GPU is."""

import json
import os

import pytest
import torch

import gpu_acceptance

def test_dry_run_checks_flags_and_writes_the_layout(tmp_path):
    environ = dict(os.environ)
    result = gpu_acceptance.main(['--dry-run', '--out', str(tmp_path / 'a.json')])
    assert dict(os.environ) == environ                  # the suite's later subprocesses must not inherit a RANK
    assert json.load(open(tmp_path / 'a.json')) == json.loads(json.dumps(result))
    assert set(result['cases']) == {'imagenet64_bf16', 'sd15_bf16_grad_ckpt'}
    with pytest.raises(SystemExit):
        gpu_acceptance.main(['--dry-run', '--only', 'cifar'])

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_acceptance_on_gpu(tmp_path):
    environ = dict(os.environ)
    result = gpu_acceptance.main(['--out', str(tmp_path / 'a.json')])
    assert dict(os.environ) == environ
    for case in result['cases'].values():
        assert case['images_per_sec'] > 0 and 0 < case['mfu'] < 1
        assert case['within_15_percent'], case['memory']
        assert case['attention_kernels']['flash'] or case['attention_kernels']['efficient'] or case['attention_kernels']['cudnn']
