"""One rank of tests/test_no_loss_train.py::test_resume_on_two_ranks_holds_one_copy_of_the_checkpoint.

python -m torch.distributed.run --nproc_per_node=2 tests/resume_memory_worker.py TRAIN_CIFAR_FLAGS...
Runs train_cifar.py and writes OUTDIR/memory-RANK.json: the anonymous memory (RssAnon: this process's private
pages; the page cache of a memory-mapped file is shared and not counted) that this rank gains while it reads
its checkpoint (rundir.start_state) and while it loads networks and optimisers from it (training_loop.restore).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rundir
import train_cifar
import train_edm
import training_loop

def rss_anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
    raise RuntimeError('no RssAnon in /proc/self/status')

def measured(fn, key, growth):
    def wrapper(*args, **kwargs):
        before = rss_anon()
        out = fn(*args, **kwargs)
        growth[key] = rss_anon() - before
        return out
    return wrapper

if __name__ == '__main__':
    growth = {}
    rundir.start_state = measured(rundir.start_state, 'load', growth)
    training_loop.restore = measured(training_loop.restore, 'restore', growth)
    train_edm.main(train_cifar.__doc__, train_cifar.PRESET)
    outdir = sys.argv[sys.argv.index('--outdir') + 1]
    with open(os.path.join(outdir, f'memory-{os.environ["RANK"]}.json'), 'w') as f:
        json.dump(growth, f)

#----------------------------------------------------------------------------
