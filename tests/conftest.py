"""Test-wide settings: one torch thread (the models here are tiny; on a shared 2-core machine a second
thread makes them several times slower, not faster)."""

import torch

torch.set_num_threads(1)
