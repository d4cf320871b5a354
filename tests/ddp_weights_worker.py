"""One rank of the 2-process gloo run in tests/test_fdistill.py::test_ddp_weights_match_one_process.

python tests/ddp_weights_worker.py RANK WORLD_SIZE INIT_FILE INPUTS OUTPUT
Loads the global batch from INPUTS, keeps its own contiguous share, computes fdistill.weights() and weight_stats() under
torch.distributed and saves (h_bar of its share, diagnostics) to OUTPUT.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fdistill

#----------------------------------------------------------------------------

def main(rank, world_size, init_file, inputs, output):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    batch = torch.load(inputs, map_location='cpu', weights_only=True)
    share = lambda x: x.chunk(world_size)[rank]
    logits, sigma = share(batch['logits']), share(batch['sigma'])
    h_bar = fdistill.weights(logits, sigma, fdistill.divergence(batch['f']), batch['r_min'], batch['r_max'], batch['edges'])
    stats = fdistill.weight_stats(logits, h_bar, sigma, batch['r_min'], batch['r_max'], batch['edges'])
    torch.save(dict(h_bar=h_bar, stats=stats), output)
    dist.barrier()
    dist.destroy_process_group()

if __name__ == '__main__':
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])

#----------------------------------------------------------------------------
